package cnm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"
)

// Backend does what dockerd asks of the plugin. Its errors are answered
// to dockerd as they are, so they say what is wrong and what to do. Its
// methods may be called concurrently.
type Backend interface {
	RequestPool(ctx context.Context, r RequestPoolRequest) (RequestPoolResponse, error)
	ReleasePool(ctx context.Context, r ReleasePoolRequest) error
	RequestAddress(ctx context.Context, r RequestAddressRequest) (RequestAddressResponse, error)
	ReleaseAddress(ctx context.Context, r ReleaseAddressRequest) error

	CreateNetwork(ctx context.Context, r CreateNetworkRequest) error
	DeleteNetwork(ctx context.Context, r NetworkRequest) error
	CreateEndpoint(ctx context.Context, r CreateEndpointRequest) (CreateEndpointResponse, error)
	EndpointOperInfo(ctx context.Context, r EndpointRequest) (EndpointOperInfoResponse, error)
	DeleteEndpoint(ctx context.Context, r EndpointRequest) error
	Join(ctx context.Context, r JoinRequest) (JoinResponse, error)
	Leave(ctx context.Context, r EndpointRequest) error
	ProgramExternalConnectivity(ctx context.Context, r ProgramExternalConnectivityRequest) error
	RevokeExternalConnectivity(ctx context.Context, r EndpointRequest) error
}

// Address spaces of the IPAM driver: networks span hosts, so both are one.
const (
	LocalAddressSpace  = "overlay"
	GlobalAddressSpace = "overlay"
)

// maxBody bounds a request body: dockerd's are a few hundred bytes.
const maxBody = 64 << 10

// requestTimeout bounds the backend's work on one request, within the
// 30 s dockerd waits for a plugin's answer.
const requestTimeout = 25 * time.Second

// NewHandler returns the HTTP handler of both protocols over b.
func NewHandler(b Backend, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	fixed := func(path string, v any) {
		mux.HandleFunc("POST "+path, func(w http.ResponseWriter, r *http.Request) { write(w, http.StatusOK, v) })
	}
	fixed(ActivatePath, ActivateResponse{Implements: []string{"NetworkDriver", "IpamDriver"}})
	// Scope "global" is refused by a dockerd outside swarm mode (dockerd
	// 20.10: "This node is not a swarm manager", after CreateNetwork,
	// which it then undoes): the networks are local to each dockerd as
	// Docker sees them, and global as they connect, which is what
	// ConnectivityScope says. Each host's dockerd then creates the
	// network, and the backend maps them all onto one overlay network.
	fixed(NetworkCapabilitiesPath, NetworkCapabilities{Scope: "local", ConnectivityScope: "global"})
	// The driver keeps its state in etcd: dockerd need not replay its
	// requests after it restarts, and the endpoint's MAC address comes
	// with CreateEndpoint.
	fixed(IPAMCapabilitiesPath, IPAMCapabilities{})
	fixed(DefaultAddressSpacesPath, AddressSpaces{LocalDefaultAddressSpace: LocalAddressSpace, GlobalDefaultAddressSpace: GlobalAddressSpace})
	// Swarm's calls, and discovery, which this driver does not use: its
	// hosts find each other through etcd and gossip.
	for _, p := range []string{AllocateNetworkPath, FreeNetworkPath, DiscoverNewPath, DiscoverDeletePath} {
		fixed(p, struct{}{})
	}

	handle(mux, log, RequestPoolPath, b.RequestPool)
	handle(mux, log, ReleasePoolPath, none(b.ReleasePool))
	handle(mux, log, RequestAddressPath, b.RequestAddress)
	handle(mux, log, ReleaseAddressPath, none(b.ReleaseAddress))
	handle(mux, log, CreateNetworkPath, none(b.CreateNetwork))
	handle(mux, log, DeleteNetworkPath, none(b.DeleteNetwork))
	handle(mux, log, CreateEndpointPath, b.CreateEndpoint)
	handle(mux, log, EndpointOperInfoPath, b.EndpointOperInfo)
	handle(mux, log, DeleteEndpointPath, none(b.DeleteEndpoint))
	handle(mux, log, JoinPath, b.Join)
	handle(mux, log, LeavePath, none(b.Leave))
	handle(mux, log, ProgramExternalConnPath, none(b.ProgramExternalConnectivity))
	handle(mux, log, RevokeExternalConnPath, none(b.RevokeExternalConnectivity))

	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		write(w, http.StatusNotFound, ErrorResponse{Err: fmt.Sprintf("%s %s: not a request of the network or IPAM driver protocol", r.Method, r.URL.Path)})
	})
	return mux
}

// none adapts a backend method that answers nothing but its error.
func none[Req any](fn func(context.Context, Req) error) func(context.Context, Req) (struct{}, error) {
	return func(ctx context.Context, r Req) (struct{}, error) { return struct{}{}, fn(ctx, r) }
}

// handle serves path: it decodes the request, calls fn within
// requestTimeout and answers its response, or its error as {"Err"}.
// Fields it does not know are ignored, so that a newer dockerd that sends
// more still works; a body that is not JSON is refused.
func handle[Req, Resp any](mux *http.ServeMux, log *slog.Logger, path string, fn func(context.Context, Req) (Resp, error)) {
	op := path[1:]
	mux.HandleFunc("POST "+path, func(w http.ResponseWriter, r *http.Request) {
		var req Req
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
		if err := dec.Decode(&req); err != nil && !errors.Is(err, io.EOF) {
			log.Warn("docker plugin: malformed request", "op", op, "err", err)
			write(w, http.StatusInternalServerError, ErrorResponse{Err: fmt.Sprintf("%s: malformed request: %v", op, err)})
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
		defer cancel()
		resp, err := fn(ctx, req)
		if err != nil {
			log.Warn("docker plugin: request refused", "op", op, "err", err)
			write(w, http.StatusInternalServerError, ErrorResponse{Err: err.Error()})
			return
		}
		write(w, http.StatusOK, resp)
	})
}

func write(w http.ResponseWriter, code int, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		code, data = http.StatusInternalServerError, []byte(`{"Err":"encode the answer"}`)
	}
	w.Header().Set("Content-Type", ContentType)
	w.WriteHeader(code)
	w.Write(data)
}
