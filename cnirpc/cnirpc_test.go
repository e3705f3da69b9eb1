package cnirpc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
	"github.com/overlaynet/overlay/overlay"
)

type fakeHandler struct {
	addrs    map[string]netip.Prefix
	flushErr error
}

func (f *fakeHandler) Flush(context.Context, string) error { return f.flushErr }

func (f *fakeHandler) Add(_ context.Context, r cnirpc.Request) (cnirpc.Attachment, error) {
	if r.Network != "default" {
		return cnirpc.Attachment{}, cnirpc.Errorf(cnirpc.CodeInvalidNetwork, "unknown network %q", r.Network)
	}
	a, ok := f.addrs[r.ContainerID]
	if !ok {
		a = netip.MustParsePrefix("198.19.0.2/26")
		f.addrs[r.ContainerID] = a
	}
	return cnirpc.Attachment{Network: r.Network, Addr: a, Gateway: netip.MustParseAddr("198.19.0.1"), MTU: 1450, Bridge: "ovbr-default", New: !ok}, nil
}

func (f *fakeHandler) Del(_ context.Context, r cnirpc.Request) error {
	delete(f.addrs, r.ContainerID)
	return nil
}

func (f *fakeHandler) Check(_ context.Context, r cnirpc.Request) (cnirpc.Attachment, error) {
	if _, ok := f.addrs[r.ContainerID]; !ok {
		return cnirpc.Attachment{}, cnirpc.Errorf(cnirpc.CodeUnknownContainer, "no address for %s", r.ContainerID)
	}
	return cnirpc.Attachment{Network: r.Network, Addr: f.addrs[r.ContainerID]}, nil
}

func (f *fakeHandler) GC(_ context.Context, r cnirpc.GCRequest) (cnirpc.GCResponse, error) {
	valid := map[string]bool{}
	for _, k := range r.Valid {
		valid[k.ContainerID] = true
	}
	var out cnirpc.GCResponse
	for id := range f.addrs {
		if !valid[id] {
			delete(f.addrs, id)
			out.Released = append(out.Released, overlay.AttachmentKey{ContainerID: id, IfName: "eth0"})
		}
	}
	return out, nil
}

func (f *fakeHandler) Status(_ context.Context, network string) (cnirpc.Status, error) {
	if network == "boom" {
		return cnirpc.Status{}, errors.New("store exploded")
	}
	return cnirpc.Status{Network: network, Ready: true, FreeAddresses: 61}, nil
}

// socketPath returns a path for a Unix socket below a fresh directory of
// /tmp, removed after the test: t.TempDir's paths can exceed the 108
// bytes of a socket address.
func socketPath(t *testing.T, elem ...string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ovl-rpc-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(append([]string{dir}, elem...)...)
}

func serve(t *testing.T) (socket string) {
	t.Helper()
	socket, _ = serveFake(t)
	return socket
}

func serveFake(t *testing.T) (socket string, h *fakeHandler) {
	t.Helper()
	socket = socketPath(t, "run", "overlayd.sock")
	l, err := rpcserver.Listen(socket)
	if err != nil {
		t.Fatal(err)
	}
	h = &fakeHandler{addrs: map[string]netip.Prefix{}}
	srv := &http.Server{Handler: rpcserver.NewHandler(h, slog.New(slog.NewTextHandler(io.Discard, nil)))}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return socket, h
}

// TestAddEarly: the early answer comes before the confirmation, which
// carries the flush's error; a plain ADD fails with it outright.
func TestAddEarly(t *testing.T) {
	ctx := context.Background()
	socket, h := serveFake(t)
	c := cnirpc.NewClient(socket)
	req := cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "eth0"}
	a, p, err := c.AddEarly(ctx, req)
	if err != nil || !a.Confirm || a.Addr.String() != "198.19.0.2/26" {
		t.Fatalf("AddEarly = %+v, %v", a, err)
	}
	if err := p.Wait(); err != nil {
		t.Fatalf("Wait = %v", err)
	}
	p.Close()

	h.flushErr = cnirpc.Errorf(cnirpc.CodeTryAgainLater, "disk full")
	a, p, err = c.AddEarly(ctx, req)
	if err != nil || !a.Confirm {
		t.Fatalf("AddEarly with a failing flush = %+v, %v; want the early answer", a, err)
	}
	var e *cnirpc.Error
	if err := p.Wait(); !errors.As(err, &e) || e.Code != cnirpc.CodeTryAgainLater || e.Msg != "disk full" {
		t.Fatalf("Wait with a failing flush = %v, want code 11", err)
	}
	if _, err := c.Add(ctx, req); !errors.As(err, &e) || e.Code != cnirpc.CodeTryAgainLater {
		t.Fatalf("Add with a failing flush = %v, want code 11", err)
	}
}

// TestAddEarlyFromOlderServer: a server that knows no early answers
// answers once, durable; Wait then has nothing to wait for.
func TestAddEarlyFromOlderServer(t *testing.T) {
	socket := socketPath(t, "old.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"network":"default","addr":"198.19.0.2/26","gateway":"198.19.0.1","mtu":1450,"bridge":"ovbr-default","new":true}`))
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	a, p, err := cnirpc.NewClient(socket).AddEarly(context.Background(), cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "eth0"})
	if err != nil || a.Confirm || !a.New {
		t.Fatalf("AddEarly = %+v, %v", a, err)
	}
	if err := p.Wait(); err != nil {
		t.Fatalf("Wait = %v", err)
	}
	p.Close()
}

func TestRoundTrip(t *testing.T) {
	ctx := context.Background()
	socket := serve(t)
	fi, err := os.Stat(socket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v, want 0600", fi.Mode().Perm())
	}
	if _, err := rpcserver.Listen(socket); err == nil || !strings.Contains(err.Error(), "another overlayd") {
		t.Errorf("second Listen on a live socket = %v", err)
	}

	c := cnirpc.NewClient(socket)
	req := cnirpc.Request{Network: "default", ContainerID: "abc123", IfName: "eth0"}
	a, err := c.Add(ctx, req)
	if err != nil || a.Addr.String() != "198.19.0.2/26" || !a.New {
		t.Fatalf("Add = %+v, %v", a, err)
	}
	if a, err = c.Add(ctx, req); err != nil || a.New {
		t.Fatalf("second Add = %+v, %v; want not new", a, err)
	}
	if _, err := c.Check(ctx, req); err != nil {
		t.Fatalf("Check = %v", err)
	}
	if err := c.Del(ctx, req); err != nil {
		t.Fatalf("Del = %v", err)
	}
	var e *cnirpc.Error
	if _, err := c.Check(ctx, req); !errors.As(err, &e) || e.Code != cnirpc.CodeUnknownContainer {
		t.Fatalf("Check after Del = %v, want code 3", err)
	}
	other := cnirpc.Request{Network: "default", ContainerID: "keep", IfName: "eth0"}
	if _, err := c.Add(ctx, other); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Add(ctx, req); err != nil {
		t.Fatal(err)
	}
	gc, err := c.GC(ctx, cnirpc.GCRequest{Network: "default", Valid: []overlay.AttachmentKey{{ContainerID: "keep", IfName: "eth0"}}})
	if err != nil || len(gc.Released) != 1 || gc.Released[0].ContainerID != req.ContainerID {
		t.Fatalf("GC = %+v, %v; want %s released", gc, err, req.ContainerID)
	}
	st, err := c.Status(ctx, "default")
	if err != nil || !st.Ready || st.FreeAddresses != 61 {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	if _, err := c.Status(ctx, "boom"); !errors.As(err, &e) || e.Code != cnirpc.CodeInternal || !strings.Contains(e.Error(), "store exploded") {
		t.Fatalf("Status failure = %v, want code %d with the cause", err, cnirpc.CodeInternal)
	}
}

func TestBadRequests(t *testing.T) {
	ctx := context.Background()
	c := cnirpc.NewClient(serve(t))
	cases := []struct {
		req  cnirpc.Request
		code uint
	}{
		{cnirpc.Request{Network: "other", ContainerID: "abc", IfName: "eth0"}, cnirpc.CodeInvalidNetwork},
		{cnirpc.Request{Network: "", ContainerID: "abc", IfName: "eth0"}, cnirpc.CodeInvalidNetwork},
		{cnirpc.Request{Network: "default", ContainerID: "-bad", IfName: "eth0"}, cnirpc.CodeInvalidEnvironment},
		{cnirpc.Request{Network: "default", ContainerID: "a/b", IfName: "eth0"}, cnirpc.CodeInvalidEnvironment},
		{cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "this-name-is-too-long"}, cnirpc.CodeInvalidEnvironment},
		{cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "a/b"}, cnirpc.CodeInvalidEnvironment},
	}
	for _, tc := range cases {
		_, err := c.Add(ctx, tc.req)
		var e *cnirpc.Error
		if !errors.As(err, &e) || e.Code != tc.code {
			t.Errorf("Add(%+v) = %v, want code %d", tc.req, err, tc.code)
		}
	}
}

func TestMalformedBody(t *testing.T) {
	socket := serve(t)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
	for _, body := range []string{"", "{", `{"network": 7}`, strings.Repeat("[", 100000)} {
		resp, err := hc.Post("http://x/v1/add", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(data), `"code":6`) {
			t.Errorf("body %.20q: %s %s, want 400 with code 6", body, resp.Status, data)
		}
	}
	resp, err := hc.Post("http://x/v9/add", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown version: %s, want 404", resp.Status)
	}
}

func TestUnavailable(t *testing.T) {
	c := cnirpc.NewClient(filepath.Join(t.TempDir(), "missing.sock"))
	_, err := c.Add(context.Background(), cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "eth0"})
	if !errors.Is(err, cnirpc.ErrUnavailable) {
		t.Fatalf("Add without overlayd = %v, want ErrUnavailable", err)
	}
}

// The rules Validate implements by hand, as regexps: the oracle of the
// fuzz test.
var (
	containerIDRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)
	ifNameRE      = regexp.MustCompile(`^[^/:\s]+$`)
)

func FuzzRequestValidate(f *testing.F) {
	f.Add("default", "abc123", "eth0")
	f.Add("", "-x", "a/b")
	f.Add("n", "a.b_c-d", "eth0:1")
	f.Add("n", "abc", "e\xfft\x0b")
	f.Fuzz(func(t *testing.T, network, cid, ifname string) {
		err := cnirpc.Request{Network: network, ContainerID: cid, IfName: ifname}.Validate()
		want := network != "" && len(cid) <= 256 && containerIDRE.MatchString(cid) &&
			len(ifname) <= 15 && ifNameRE.MatchString(ifname) && ifname != "." && ifname != ".."
		if (err == nil) != want {
			t.Fatalf("Validate(%q, %q, %q) = %v, want valid %v", network, cid, ifname, err, want)
		}
	})
}

// FuzzHandler: any request body on any operation gets an answer with a
// CNI error code or a success, never a panic or a 500 without a code.
func FuzzHandler(f *testing.F) {
	f.Add("add", []byte(`{"network":"default","containerID":"abc","ifName":"eth0"}`))
	f.Add("gc", []byte(`{"network":"default","valid":[{"containerID":"a","ifName":"eth0"}]}`))
	f.Add("del", []byte(`{"network":"default","containerID":"abc","ifName":"eth0","ip":"198.19.0.9"}`))
	f.Add("check", []byte(`{"network":`))
	h := rpcserver.NewHandler(&fakeHandler{addrs: map[string]netip.Prefix{}}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	f.Fuzz(func(t *testing.T, op string, body []byte) {
		if !slices.Contains([]string{"add", "del", "check", "gc"}, op) {
			op = "add"
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "/v1/"+op, bytes.NewReader(body)))
		if w.Code == http.StatusOK {
			return
		}
		var e cnirpc.Error
		if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Code == 0 {
			t.Fatalf("%s %q: %d %q: not a CNI error", op, body, w.Code, w.Body.String())
		}
	})
}

// TestNoAnswer: an overlayd that accepts but never answers costs a request
// its deadline, or less when the context is cancelled, and the error says
// the request may have been acted on.
func TestNoAnswer(t *testing.T) {
	socket := socketPath(t, "silent.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		var held []net.Conn // read nothing, answer nothing
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	c := cnirpc.NewClient(socket)
	req := cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "eth0"}

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := c.Add(ctx, req); !errors.Is(err, cnirpc.ErrNoAnswer) {
		t.Fatalf("Add to a silent overlayd = %v, want ErrNoAnswer", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the deadline did not bound the request: %s", d)
	}

	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	if _, _, err := c.AddEarly(ctx, req); !errors.Is(err, cnirpc.ErrNoAnswer) {
		t.Fatalf("AddEarly cancelled = %v, want ErrNoAnswer", err)
	}
}

// TestRequestEndpoint: a request's MAC address must be unicast Ethernet
// (code 2), its labels valid (code 7); both are optional.
func TestRequestEndpoint(t *testing.T) {
	base := cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "eth0"}
	ok := base
	ok.MAC, ok.Labels = "02:00:00:00:00:01", map[string]string{"app": "web"}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid request: %v", err)
	}
	if mac, err := ok.HardwareAddr(); err != nil || mac.String() != "02:00:00:00:00:01" {
		t.Fatalf("HardwareAddr = %v, %v", mac, err)
	}
	if mac, err := base.HardwareAddr(); mac != nil || err != nil {
		t.Fatalf("HardwareAddr of none = %v, %v; want nil, nil", mac, err)
	}
	for _, tc := range []struct {
		mac    string
		labels map[string]string
		code   uint
	}{
		{mac: "01:00:5e:00:00:01", code: cnirpc.CodeUnsupportedField},
		{mac: "00:00:00:00:00:00", code: cnirpc.CodeUnsupportedField},
		{mac: "02:00:00:00:00:00:00:01", code: cnirpc.CodeUnsupportedField},
		{mac: "nonsense", code: cnirpc.CodeUnsupportedField},
		{labels: map[string]string{"": "v"}, code: cnirpc.CodeInvalidNetwork},
		{labels: map[string]string{"k": "a\nb"}, code: cnirpc.CodeInvalidNetwork},
	} {
		r := base
		r.MAC, r.Labels = tc.mac, tc.labels
		var e *cnirpc.Error
		if err := r.Validate(); !errors.As(err, &e) || e.Code != tc.code {
			t.Errorf("Validate(mac %q, labels %q) = %v; want code %d", tc.mac, tc.labels, err, tc.code)
		}
	}
}
