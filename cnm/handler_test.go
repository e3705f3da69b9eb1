package cnm

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// recorder is a Backend that records its calls and answers from fields.
type recorder struct {
	calls []string
	err   error
	pool  RequestPoolRequest
	join  JoinRequest
}

func (r *recorder) call(name string) error { r.calls = append(r.calls, name); return r.err }

func (r *recorder) RequestPool(_ context.Context, q RequestPoolRequest) (RequestPoolResponse, error) {
	r.pool = q
	return RequestPoolResponse{PoolID: "red", Pool: q.Pool}, r.call("RequestPool")
}
func (r *recorder) ReleasePool(context.Context, ReleasePoolRequest) error {
	return r.call("ReleasePool")
}
func (r *recorder) RequestAddress(context.Context, RequestAddressRequest) (RequestAddressResponse, error) {
	return RequestAddressResponse{Address: "10.30.0.5/16"}, r.call("RequestAddress")
}
func (r *recorder) ReleaseAddress(context.Context, ReleaseAddressRequest) error {
	return r.call("ReleaseAddress")
}
func (r *recorder) CreateNetwork(context.Context, CreateNetworkRequest) error {
	return r.call("CreateNetwork")
}
func (r *recorder) DeleteNetwork(context.Context, NetworkRequest) error {
	return r.call("DeleteNetwork")
}
func (r *recorder) CreateEndpoint(context.Context, CreateEndpointRequest) (CreateEndpointResponse, error) {
	return CreateEndpointResponse{}, r.call("CreateEndpoint")
}
func (r *recorder) EndpointOperInfo(context.Context, EndpointRequest) (EndpointOperInfoResponse, error) {
	return EndpointOperInfoResponse{Value: map[string]any{}}, r.call("EndpointOperInfo")
}
func (r *recorder) DeleteEndpoint(context.Context, EndpointRequest) error {
	return r.call("DeleteEndpoint")
}
func (r *recorder) Join(_ context.Context, q JoinRequest) (JoinResponse, error) {
	r.join = q
	return JoinResponse{InterfaceName: InterfaceName{SrcName: "ovc1234", DstPrefix: "eth"}, Gateway: "10.30.0.1"}, r.call("Join")
}
func (r *recorder) Leave(context.Context, EndpointRequest) error { return r.call("Leave") }
func (r *recorder) ProgramExternalConnectivity(context.Context, ProgramExternalConnectivityRequest) error {
	return r.call("ProgramExternalConnectivity")
}
func (r *recorder) RevokeExternalConnectivity(context.Context, EndpointRequest) error {
	return r.call("RevokeExternalConnectivity")
}

func post(h http.Handler, path, body string) (int, string, string) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", path, strings.NewReader(body)))
	return rec.Code, rec.Body.String(), rec.Header().Get("Content-Type")
}

// TestFixedAnswers: the handshake names both protocols, the network
// driver is local to each dockerd and connects globally, and Swarm's and
// discovery's calls are accepted.
func TestFixedAnswers(t *testing.T) {
	h := NewHandler(&recorder{}, nil)
	for path, want := range map[string]string{
		ActivatePath:             `{"Implements":["NetworkDriver","IpamDriver"]}`,
		NetworkCapabilitiesPath:  `{"Scope":"local","ConnectivityScope":"global"}`,
		IPAMCapabilitiesPath:     `{"RequiresMACAddress":false,"RequiresRequestReplay":false}`,
		DefaultAddressSpacesPath: `{"LocalDefaultAddressSpace":"overlay","GlobalDefaultAddressSpace":"overlay"}`,
		DiscoverNewPath:          `{}`,
		AllocateNetworkPath:      `{}`,
	} {
		code, body, ctype := post(h, path, "")
		if code != 200 || body != want || ctype != ContentType {
			t.Errorf("%s: %d %s (%s); want 200 %s", path, code, body, ctype, want)
		}
	}
}

// TestRequests: each request reaches its backend method decoded, and its
// answer goes back as JSON; a backend's error is {"Err"} with status 500.
func TestRequests(t *testing.T) {
	b := &recorder{}
	h := NewHandler(b, nil)
	code, body, _ := post(h, RequestPoolPath, `{"AddressSpace":"overlay","Pool":"10.30.0.0/16","Options":{"network":"red"},"V6":false,"SomethingNewer":1}`)
	if code != 200 || body != `{"PoolID":"red","Pool":"10.30.0.0/16"}` || b.pool.Options["network"] != "red" {
		t.Fatalf("RequestPool: %d %s (%+v)", code, body, b.pool)
	}
	code, body, _ = post(h, JoinPath, `{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"/var/run/docker/netns/abc","Options":{}}`)
	var jr JoinResponse
	if code != 200 || json.Unmarshal([]byte(body), &jr) != nil || jr.InterfaceName.SrcName != "ovc1234" || jr.Gateway != "10.30.0.1" || b.join.SandboxKey != "/var/run/docker/netns/abc" {
		t.Fatalf("Join: %d %s", code, body)
	}
	for _, path := range []string{ReleasePoolPath, RequestAddressPath, ReleaseAddressPath, CreateNetworkPath, DeleteNetworkPath,
		CreateEndpointPath, EndpointOperInfoPath, DeleteEndpointPath, LeavePath, ProgramExternalConnPath, RevokeExternalConnPath} {
		if code, body, _ := post(h, path, `{"NetworkID":"n1","EndpointID":"e1","PoolID":"red"}`); code != 200 || !json.Valid([]byte(body)) {
			t.Errorf("%s: %d %s", path, code, body)
		}
	}
	if len(b.calls) != 13 {
		t.Errorf("backend calls %v", b.calls)
	}

	b.err = errors.New(`network "red" has containers on 2 hosts: remove them first`)
	code, body, _ = post(h, DeleteNetworkPath, `{"NetworkID":"n1"}`)
	if code != 500 || body != `{"Err":"network \"red\" has containers on 2 hosts: remove them first"}` {
		t.Fatalf("a refusal: %d %s", code, body)
	}
}

// TestBadInput: malformed JSON, a body too large and an unknown request
// are answered with {"Err"} that says what is wrong, and reach no
// backend method.
func TestBadInput(t *testing.T) {
	b := &recorder{}
	h := NewHandler(b, nil)
	for _, c := range []struct {
		path, body string
		code       int
		says       string
	}{
		{CreateNetworkPath, `{"NetworkID":`, 500, "NetworkDriver.CreateNetwork: malformed request"},
		{RequestAddressPath, `[1,2]`, 500, "malformed request"},
		{JoinPath, `{"NetworkID":"` + strings.Repeat("x", maxBody) + `"}`, 500, "malformed request"},
		{"/NetworkDriver.Frobnicate", `{}`, 404, "not a request of the network or IPAM driver protocol"},
	} {
		code, body, _ := post(h, c.path, c.body)
		var e ErrorResponse
		if code != c.code || json.Unmarshal([]byte(body), &e) != nil || !strings.Contains(e.Err, c.says) {
			t.Errorf("%s %.40s: %d %s; want %d saying %q", c.path, c.body, code, body, c.code, c.says)
		}
	}
	if len(b.calls) != 0 {
		t.Errorf("bad input reached the backend: %v", b.calls)
	}
}
