package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/gossip"
	"github.com/overlaynet/overlay/internal/version"
)

// controlTimeout bounds one overlayctl request: the doctor's reads of
// etcd and the kernel, and the wait for a reconcile pass per network.
// It is below the socket's WriteTimeout (30 s), so that the answer, even
// one cut short, is written.
const controlTimeout = 25 * time.Second

// maxControlBody bounds a request body of overlayctl's.
const maxControlBody = 4 << 10

// controlPlane is what the control handler serves from: the host runtime
// and its networks.
type controlPlane interface {
	status(ctx context.Context) ctlapi.Status
	doctor(ctx context.Context) ctlapi.Report
	release(ctx context.Context, req ctlapi.ReleaseRequest) (ctlapi.ReleaseResponse, error)
}

// controlHandler serves overlayctl's requests (package ctlapi) on the
// CNI socket, below /v1/host/.
func controlHandler(cp controlPlane, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ctlapi.StatusPath, func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), controlTimeout)
		defer cancel()
		writeControl(w, http.StatusOK, cp.status(ctx))
	})
	mux.HandleFunc("POST "+ctlapi.DoctorPath, func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), controlTimeout)
		defer cancel()
		writeControl(w, http.StatusOK, cp.doctor(ctx))
	})
	mux.HandleFunc("POST "+ctlapi.ReleasePath, func(w http.ResponseWriter, r *http.Request) {
		var req ctlapi.ReleaseRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxControlBody))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeControl(w, http.StatusBadRequest, ctlapi.ErrorBody{Error: "release: malformed request: " + err.Error()})
			return
		}
		if req.Network == "" || !req.Addr.Is4() {
			writeControl(w, http.StatusBadRequest, ctlapi.ErrorBody{Error: "release: want a network and an IPv4 address"})
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), controlTimeout)
		defer cancel()
		out, err := cp.release(ctx, req)
		if err != nil {
			code := http.StatusInternalServerError
			switch attach.KindOf(err) {
			case attach.NotFound, attach.UnknownNetwork:
				code = http.StatusNotFound
			case attach.Invalid:
				code = http.StatusConflict
			case attach.Starting, attach.Unavailable:
				code = http.StatusServiceUnavailable
			}
			log.Warn("overlayctl: release refused", "network", req.Network, "addr", req.Addr, "err", err)
			writeControl(w, code, ctlapi.ErrorBody{Error: err.Error()})
			return
		}
		writeControl(w, http.StatusOK, out)
	})
	return mux
}

func writeControl(w http.ResponseWriter, code int, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		code, data = http.StatusInternalServerError, []byte(`{"error":"encode the answer"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(append(data, '\n'))
}

// control is the host runtime as overlayctl sees it: the host and the
// set of its networks.
type control struct {
	h   *host
	set *networkSet
}

var _ controlPlane = control{}

func (c control) status(ctx context.Context) ctlapi.Status {
	h := c.h
	st := ctlapi.Status{
		Host: h.id, Version: version.Read().Line("overlayd"), Started: h.started, Underlay: h.ul.Addr, VTEPMAC: h.mac.String(),
		Etcd:     ctlapi.EtcdStatus{Embedded: h.embedded, Endpoints: h.store.Client().Endpoints()},
		Liveness: h.live.Alive(),
		Gossip:   ctlapi.GossipStatus{Addr: h.gossipAddr, Members: h.gossip.Stats().Members, Encrypted: h.gossip.Encrypted()},
		Networks: []ctlapi.NetworkStatus{},
		Peers:    []ctlapi.PeerStatus{},
	}
	if err := h.ping(ctx); err != nil {
		st.Etcd.Error = err.Error()
	}
	var mesh map[string]map[string]int
	if h.mesh != nil {
		mesh = make(map[string]map[string]int)
		for _, ms := range h.mesh.States() {
			if mesh[ms.Network] == nil {
				mesh[ms.Network] = make(map[string]int)
			}
			mesh[ms.Network][ms.Word()]++
		}
	}
	for _, n := range c.set.Started() {
		ns := n.Inspect(ctx)
		if mesh != nil {
			ns.Mesh = mesh[ns.Name]
			if ns.Mesh == nil {
				ns.Mesh = map[string]int{}
			}
		}
		st.Networks = append(st.Networks, ns)
	}
	// The peers as the reconcile loops last read them: no read of etcd
	// that could hang the answer while etcd is down.
	for _, rec := range h.dir.Records() {
		if rec.Host == h.id {
			continue
		}
		st.Peers = append(st.Peers, ctlapi.PeerStatus{Host: rec.Host, Underlay: rec.Underlay, Gossip: gossipWord(h.gossip.State(rec.Host))})
	}
	return st
}

// gossipWord names a gossip state in PeerStatus's words.
func gossipWord(s gossip.State) string {
	switch s {
	case gossip.Alive:
		return "alive"
	case gossip.Suspect:
		return "suspect"
	case gossip.Departed:
		return "dead"
	}
	return "unknown"
}

func (c control) doctor(ctx context.Context) ctlapi.Report {
	return c.h.doctor(ctx, c.set.Started(), c.set.Kick)
}

// pingTimeout bounds the doctor's and the status's check that etcd
// answers: the etcd client waits for a connection until its context
// ends, and an outage must not use up the whole request.
const pingTimeout = 3 * time.Second

// ping checks that etcd answers a quorum read within pingTimeout.
func (h *host) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	return h.store.Ping(ctx)
}

func (c control) release(ctx context.Context, req ctlapi.ReleaseRequest) (ctlapi.ReleaseResponse, error) {
	n, ok := c.set.Runtime(req.Network)
	if !ok {
		known := c.set.Names()
		if slices.Contains(known, req.Network) {
			return ctlapi.ReleaseResponse{}, &attach.Error{Kind: attach.Starting, Msg: fmt.Sprintf("release: network %s is starting on this host; try again in a moment", req.Network)}
		}
		return ctlapi.ReleaseResponse{}, &attach.Error{Kind: attach.UnknownNetwork, Msg: fmt.Sprintf("release: this host serves no network %q (it serves: %s)", req.Network, strings.Join(known, ", "))}
	}
	if !n.Inspect(ctx).CIDR.Contains(req.Addr) {
		return ctlapi.ReleaseResponse{}, &attach.Error{Kind: attach.Invalid, Msg: fmt.Sprintf("release: %s is not an address of network %s", req.Addr, req.Network)}
	}
	return n.Release(ctx, req.Addr, req.Force)
}
