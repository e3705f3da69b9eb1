package rpcserver_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
)

// fakeHandler answers every operation at once, except Flush, which takes
// flushDelay unless its context ends first.
type fakeHandler struct {
	flushDelay time.Duration
	cancelled  atomic.Int32 // Flushes whose context ended
}

func (f *fakeHandler) Add(_ context.Context, r cnirpc.Request) (cnirpc.Attachment, error) {
	return cnirpc.Attachment{Network: r.Network, Addr: netip.MustParsePrefix("198.19.0.2/26"),
		Gateway: netip.MustParseAddr("198.19.0.1"), MTU: 1450, Bridge: "ovbr-default", New: true}, nil
}

func (f *fakeHandler) Flush(ctx context.Context, _ string) error {
	if f.flushDelay == 0 {
		return nil
	}
	t := time.NewTimer(f.flushDelay)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		f.cancelled.Add(1)
		return ctx.Err()
	}
}

func (f *fakeHandler) Del(context.Context, cnirpc.Request) error { return nil }

func (f *fakeHandler) Check(_ context.Context, r cnirpc.Request) (cnirpc.Attachment, error) {
	return f.Add(context.Background(), r)
}

func (f *fakeHandler) Status(_ context.Context, network string) (cnirpc.Status, error) {
	return cnirpc.Status{Network: network, Ready: true, FreeAddresses: 61}, nil
}

func (f *fakeHandler) GC(context.Context, cnirpc.GCRequest) (cnirpc.GCResponse, error) {
	return cnirpc.GCResponse{}, nil
}

// recorder is a slog.Handler that keeps every record.
type recorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (h *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *recorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recorder) WithGroup(string) slog.Handler            { return h }

func (h *recorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recs = append(h.recs, r.Clone())
	return nil
}

func (h *recorder) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.recs)
}

// find returns the first record at level whose message contains all of
// substrs, or false.
func (h *recorder) find(level slog.Level, substrs ...string) (slog.Record, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.recs {
		if r.Level != level {
			continue
		}
		ok := true
		for _, s := range substrs {
			ok = ok && strings.Contains(r.Message, s)
		}
		if ok {
			return r, true
		}
	}
	return slog.Record{}, false
}

// countingListener counts the connections it has accepted and how many
// of them were open at most at once: what the server costs in file
// descriptors.
type countingListener struct {
	net.Listener
	accepted atomic.Int64
	open     atomic.Int64
	maxOpen  atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.accepted.Add(1)
	n := l.open.Add(1)
	for m := l.maxOpen.Load(); n > m && !l.maxOpen.CompareAndSwap(m, n); m = l.maxOpen.Load() {
	}
	return &countingConn{Conn: c, l: l}, nil
}

type countingConn struct {
	net.Conn
	l    *countingListener
	once sync.Once
}

func (c *countingConn) Close() error {
	c.once.Do(func() { c.l.open.Add(-1) })
	return c.Conn.Close()
}

// noLeaks fails the test if, once its other cleanups have run, more
// goroutines are left than when it started. Call it first.
func noLeaks(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Errorf("%d goroutines left, %d before the test:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// served is a running server on a Unix socket.
type served struct {
	socket string
	srv    *rpcserver.Server
	cl     *countingListener
	log    *recorder
	done   chan error // Serve's result
}

// serveWith serves h within cfg on a socket made by rpcserver.Listen, in
// a short directory below /tmp (t.TempDir's paths can exceed the 108
// bytes of a socket address). The server is closed at the test's end.
func serveWith(t *testing.T, cfg rpcserver.ServerConfig, h http.Handler) *served {
	t.Helper()
	dir, err := os.MkdirTemp("", "ovl-rs-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &served{socket: filepath.Join(dir, "run", "overlayd.sock"), log: &recorder{}, done: make(chan error, 1)}
	l, err := rpcserver.Listen(s.socket)
	if err != nil {
		t.Fatal(err)
	}
	s.cl = &countingListener{Listener: l}
	s.srv = rpcserver.NewServer(h, cfg, slog.New(s.log))
	go func() { s.done <- s.srv.Serve(s.cl) }()
	t.Cleanup(func() {
		s.srv.Close()
		if err := <-s.done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve = %v, want http.ErrServerClosed", err)
		}
		s.done <- http.ErrServerClosed
	})
	return s
}

// serveFake serves the protocol over a fakeHandler.
func serveFake(t *testing.T, cfg rpcserver.ServerConfig, f *fakeHandler) *served {
	t.Helper()
	return serveWith(t, cfg, rpcserver.NewHandler(f, slog.New(slog.DiscardHandler)))
}

// Requests of a stalled client: headers whose body never comes, and
// headers cut short.
const (
	stalledBody    = "POST /v1/add HTTP/1.1\r\nHost: overlayd\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"network\":"
	stalledHeaders = "POST /v1/add HTTP/1.1\r\nHost: overlayd\r\n"
)

// stalledClient is a connection that sends prefix and then nothing, and
// reads until the server closes it or its own deadline passes.
type stalledClient struct {
	sent     time.Time // when prefix was sent
	closed   time.Time // when the server closed the connection
	answer   string    // what the server sent before
	byServer bool      // false: the client's own deadline passed first
}

// stall connects to socket, sends prefix and waits, in a goroutine added
// to wg, for at most limit for the server to close the connection.
func stall(t *testing.T, wg *sync.WaitGroup, socket, prefix string, limit time.Duration) *stalledClient {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatalf("stalled client: %v", err)
	}
	sc := &stalledClient{}
	if prefix != "" {
		if _, err := io.WriteString(c, prefix); err != nil {
			c.Close()
			t.Fatalf("stalled client: %v", err)
		}
	}
	sc.sent = time.Now()
	c.SetReadDeadline(sc.sent.Add(limit))
	wg.Go(func() {
		defer c.Close()
		var b strings.Builder
		_, err := io.Copy(&b, c)
		sc.closed = time.Now()
		sc.answer = b.String()
		sc.byServer = !errors.Is(err, os.ErrDeadlineExceeded)
	})
	return sc
}

// waitFor polls cond every few milliseconds for at most d.
func waitFor(d time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(d); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// maxLatency bounds a request to a server that is full of stalled
// clients: it would take a few milliseconds on an idle host.
const maxLatency = time.Second

// TestStalledClientsDoNotHoldOffRequests: ten times as many stalled
// clients as the socket takes cost at most MaxConns(+1) descriptors, and
// with every slot held by one of them, real requests are answered at
// once; every stalled client is disconnected, the last ones by the read
// timeouts.
func TestStalledClientsDoNotHoldOffRequests(t *testing.T) {
	noLeaks(t)
	cfg := rpcserver.ServerConfig{
		ReadHeaderTimeout: 3 * time.Second,
		ReadTimeout:       3500 * time.Millisecond,
		WriteTimeout:      5 * time.Second,
		IdleTimeout:       time.Second,
		MaxConns:          32,
		EvictAfter:        50 * time.Millisecond,
	}
	const nStalled = 320
	s := serveFake(t, cfg, &fakeHandler{})

	var wg sync.WaitGroup
	defer wg.Wait()
	limit := cfg.ReadTimeout + 5*time.Second
	var stalled []*stalledClient
	for i := range nStalled {
		prefix := ""
		if i%2 == 1 {
			prefix = stalledBody
		}
		stalled = append(stalled, stall(t, &wg, s.socket, prefix, limit))
	}
	// The server works through the queue by closing those that have
	// waited EvictAfter; without eviction it would take ten rounds of
	// ReadHeaderTimeout.
	if !waitFor(5*time.Second, func() bool { return s.cl.accepted.Load() >= nStalled }) {
		t.Fatalf("%d of %d stalled clients accepted after 5s: they hold the socket", s.cl.accepted.Load(), nStalled)
	}

	ctx := context.Background()
	c := cnirpc.NewClient(s.socket)
	req := cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "eth0"}
	timed := func(what string, f func(context.Context) error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		start := time.Now()
		err := f(ctx)
		if d := time.Since(start); err != nil || d > maxLatency {
			t.Errorf("%s with the socket full of stalled clients: %v after %s, want an answer within %s", what, err, d.Round(time.Millisecond), maxLatency)
		}
	}
	for range 5 {
		timed("early ADD", func(ctx context.Context) error {
			a, p, err := c.AddEarly(ctx, req)
			if err != nil {
				return err
			}
			defer p.Close()
			if !a.Confirm {
				return fmt.Errorf("answer %+v has no confirmation to follow", a)
			}
			return p.Wait()
		})
		timed("ADD", func(ctx context.Context) error { _, err := c.Add(ctx, req); return err })
		timed("STATUS", func(ctx context.Context) error { _, err := c.Status(ctx, "default"); return err })
	}
	var rg sync.WaitGroup
	for range 8 {
		rg.Go(func() {
			timed("concurrent STATUS", func(ctx context.Context) error { _, err := c.Status(ctx, "default"); return err })
		})
	}
	rg.Wait()
	realDone := time.Now()

	if n, limit := s.cl.maxOpen.Load(), int64(cfg.MaxConns+1); n > limit {
		t.Errorf("the server held %d connections at once, want at most MaxConns+1 = %d", n, limit)
	}
	if _, ok := s.log.find(slog.LevelWarn, "connection limit"); !ok {
		t.Errorf("no warning that the socket is at its connection limit")
	}

	wg.Wait()
	held := 0
	for i, sc := range stalled {
		if !sc.byServer {
			t.Errorf("stalled client %d: not disconnected by the server within %s", i, limit)
			continue
		}
		if sc.closed.After(realDone) {
			held++
		}
	}
	// The scenario held: stalled clients filled the socket while the
	// real requests were served.
	if held == 0 {
		t.Errorf("no stalled client was connected after the real requests: the test did not fill the socket")
	}
}

// TestReadTimeouts: below the connection cap, a client that sends
// nothing, or part of its headers, is disconnected after
// ReadHeaderTimeout, one that stalls its body after ReadTimeout (with an
// answer saying why), and a kept-alive connection after IdleTimeout.
func TestReadTimeouts(t *testing.T) {
	noLeaks(t)
	cfg := rpcserver.ServerConfig{
		ReadHeaderTimeout: 300 * time.Millisecond,
		ReadTimeout:       2 * time.Second,
		IdleTimeout:       400 * time.Millisecond,
	}
	s := serveFake(t, cfg, &fakeHandler{})
	var wg sync.WaitGroup
	defer wg.Wait()
	limit := 10 * time.Second
	nothing := stall(t, &wg, s.socket, "", limit)
	headers := stall(t, &wg, s.socket, stalledHeaders, limit)
	body := stall(t, &wg, s.socket, stalledBody, limit)
	idle := stall(t, &wg, s.socket, "GET /v1/status?network=default HTTP/1.1\r\nHost: overlayd\r\n\r\n", limit)
	wg.Wait()

	// slack allows for a loaded host; the lower bound shows it is the
	// timeout that cut the connection, not something else. The timeouts
	// differ by more than it, so that each is told from the others (a
	// zero ReadHeaderTimeout or IdleTimeout would fall back on
	// ReadTimeout).
	const slack = 700 * time.Millisecond
	for _, tc := range []struct {
		name    string
		sc      *stalledClient
		timeout time.Duration
		answer  string
	}{
		{"nothing sent", nothing, cfg.ReadHeaderTimeout, ""},
		{"headers stalled", headers, cfg.ReadHeaderTimeout, ""},
		{"body stalled", body, cfg.ReadTimeout, `"code":6`},
		{"idle", idle, cfg.IdleTimeout, `"ready":true`},
	} {
		d := tc.sc.closed.Sub(tc.sc.sent)
		switch {
		case !tc.sc.byServer:
			t.Errorf("%s: not disconnected by the server within %s", tc.name, limit)
		case d < tc.timeout*3/4 || d > tc.timeout+slack:
			t.Errorf("%s: disconnected after %s, want about %s", tc.name, d.Round(time.Millisecond), tc.timeout)
		case !strings.Contains(tc.sc.answer, tc.answer):
			t.Errorf("%s: answer %q, want one containing %q", tc.name, tc.sc.answer, tc.answer)
		}
	}
}

// TestLongRequestsAreNotCut: a request whose work outlasts ReadTimeout
// and EvictAfter is answered in full: the read deadline does not cancel
// its context, a full socket does not evict it, and a newcomer waits for
// it to end.
func TestLongRequestsAreNotCut(t *testing.T) {
	noLeaks(t)
	cfg := rpcserver.ServerConfig{
		ReadHeaderTimeout: 200 * time.Millisecond,
		ReadTimeout:       200 * time.Millisecond,
		WriteTimeout:      5 * time.Second,
		MaxConns:          2,
		EvictAfter:        50 * time.Millisecond,
	}
	const flush = 700 * time.Millisecond
	f := &fakeHandler{flushDelay: flush}
	s := serveFake(t, cfg, f)
	c := cnirpc.NewClient(s.socket)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	var pending []*cnirpc.Pending
	for i := range cfg.MaxConns {
		a, p, err := c.AddEarly(ctx, cnirpc.Request{Network: "default", ContainerID: fmt.Sprint("c", i), IfName: "eth0"})
		if err != nil || !a.Confirm {
			t.Fatalf("AddEarly = %+v, %v", a, err)
		}
		defer p.Close()
		pending = append(pending, p)
	}
	// Both slots are held by ADDs waiting for their flush.
	start := time.Now()
	if _, err := c.Status(ctx, "default"); err != nil {
		t.Fatalf("Status while the socket is full of ADDs = %v", err)
	}
	if d := time.Since(start); d < flush/2 {
		t.Errorf("Status answered after %s, before an ADD ended: an ADD in progress was evicted", d.Round(time.Millisecond))
	}
	for i, p := range pending {
		if err := p.Wait(); err != nil {
			t.Errorf("ADD %d: confirmation = %v", i, err)
		}
	}
	if _, err := c.Add(ctx, cnirpc.Request{Network: "default", ContainerID: "plain", IfName: "eth0"}); err != nil {
		t.Errorf("Add with a flush longer than ReadTimeout = %v", err)
	}
	if n := f.cancelled.Load(); n != 0 {
		t.Errorf("%d flushes saw their request's context cancelled", n)
	}
}

// TestWriteTimeout: an answer its client does not read is cut after
// WriteTimeout.
func TestWriteTimeout(t *testing.T) {
	noLeaks(t)
	cfg := rpcserver.ServerConfig{WriteTimeout: 300 * time.Millisecond}
	type result struct {
		err error
		d   time.Duration
	}
	res := make(chan result, 1)
	s := serveWith(t, cfg, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		chunk := make([]byte, 1<<20)
		var err error
		for i := 0; i < 64 && err == nil; i++ {
			_, err = w.Write(chunk)
		}
		res <- result{err, time.Since(start)}
	}))
	conn, err := net.Dial("unix", s.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET /big HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-res:
		if r.err == nil || r.d > cfg.WriteTimeout+time.Second {
			t.Errorf("writing to a client that does not read: %v after %s, want an error after about %s", r.err, r.d.Round(time.Millisecond), cfg.WriteTimeout)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("writing to a client that does not read did not fail within 10s")
	}
}

// TestDefaultServerConfig: the write timeout outlasts the longest ADD,
// whose body is read within ReadTimeout and whose allocation and flush
// overlayd bounds to 10 s each.
func TestDefaultServerConfig(t *testing.T) {
	// That WriteTimeout covers the daemon's ADD is checked in package
	// daemon, against its own bound.
	cfg := rpcserver.DefaultServerConfig()
	if cfg.ReadTimeout < cfg.ReadHeaderTimeout {
		t.Errorf("ReadTimeout %s is shorter than ReadHeaderTimeout %s", cfg.ReadTimeout, cfg.ReadHeaderTimeout)
	}
	if cfg.MaxConns <= 0 || cfg.EvictAfter <= 0 || cfg.IdleTimeout <= 0 || cfg.MaxHeaderBytes <= 0 {
		t.Errorf("a limit is off: %+v", cfg)
	}
}

// TestErrorLogGoesToSlog: what net/http logs itself (here, a handler's
// panic) reaches the injected logger.
func TestErrorLogGoesToSlog(t *testing.T) {
	noLeaks(t)
	s := serveWith(t, rpcserver.ServerConfig{}, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		panic("handler exploded")
	}))
	conn, err := net.Dial("unix", s.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, "GET /v1/status HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, conn)
	if !waitFor(5*time.Second, func() bool {
		_, ok := s.log.find(slog.LevelError, "panic serving", "handler exploded")
		return ok
	}) {
		t.Fatalf("the HTTP server's report of a panic did not reach slog at level Error; got %d records", s.log.len())
	}
}

// TestShutdown: Shutdown closes the connections of stalled clients at
// once rather than after the read timeouts, answers the request in
// progress, and Serve returns http.ErrServerClosed.
func TestShutdown(t *testing.T) {
	noLeaks(t)
	cfg := rpcserver.ServerConfig{
		ReadHeaderTimeout: 20 * time.Second,
		ReadTimeout:       20 * time.Second,
		EvictAfter:        100 * time.Millisecond,
	}
	s := serveFake(t, cfg, &fakeHandler{flushDelay: 300 * time.Millisecond})
	var wg sync.WaitGroup
	defer wg.Wait()
	var stalled []*stalledClient
	for i := range 10 {
		prefix := ""
		if i%2 == 1 {
			prefix = stalledBody
		}
		stalled = append(stalled, stall(t, &wg, s.socket, prefix, 15*time.Second))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, p, err := cnirpc.NewClient(s.socket).AddEarly(ctx, cnirpc.Request{Network: "default", ContainerID: "abc", IfName: "eth0"})
	if err != nil || !a.Confirm {
		t.Fatalf("AddEarly = %+v, %v", a, err)
	}
	defer p.Close()
	// Let the stalled clients wait EvictAfter.
	time.Sleep(2 * cfg.EvictAfter)

	start := time.Now()
	if err := s.srv.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown = %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %s: it waited for stalled clients", d.Round(time.Millisecond))
	}
	if err := p.Wait(); err != nil {
		t.Errorf("the ADD in progress during Shutdown: confirmation = %v", err)
	}
	if err := <-s.done; !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve after Shutdown = %v, want http.ErrServerClosed", err)
	}
	s.done <- http.ErrServerClosed // for the cleanup
	wg.Wait()
	for i, sc := range stalled {
		if !sc.byServer || sc.closed.Sub(start) > 5*time.Second {
			t.Errorf("stalled client %d: not disconnected by Shutdown (by server %v, after %s)", i, sc.byServer, sc.closed.Sub(start).Round(time.Millisecond))
		}
	}
}

// TestServeHTTP11: a kept-alive HTTP/1.1 client (curl, net/http) is
// served through the limits as the plugin is.
func TestServeHTTP11(t *testing.T) {
	noLeaks(t)
	s := serveFake(t, rpcserver.ServerConfig{MaxConns: 1, EvictAfter: 50 * time.Millisecond}, &fakeHandler{})
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", s.socket)
	}}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for i := range 3 {
		resp, err := hc.Post("http://overlayd/v1/add", "application/json",
			strings.NewReader(`{"network":"default","containerID":"abc","ifName":"eth0"}`))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		br := bufio.NewReader(resp.Body)
		line, _ := br.ReadString('\n')
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(line, "198.19.0.2/26") {
			t.Fatalf("request %d: %s %q", i, resp.Status, line)
		}
	}
	// A kept-alive connection holds the only slot; the plugin's request
	// evicts it rather than waiting for IdleTimeout.
	time.Sleep(100 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := cnirpc.NewClient(s.socket).Status(ctx, "default"); err != nil {
		t.Fatalf("Status = %v", err)
	}
	if d := time.Since(start); d > maxLatency {
		t.Errorf("Status behind an idle kept-alive connection took %s", d.Round(time.Millisecond))
	}
}
