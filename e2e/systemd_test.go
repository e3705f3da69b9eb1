package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/internal/simnet"
)

// TestSystemdNotifications: a real overlayd under a fake systemd (its
// NOTIFY_SOCKET and WATCHDOG_USEC) reports its start in STATUS lines,
// sends READY=1 only once it serves ADD, pings the watchdog while its
// loops move, and sends STOPPING=1 on SIGTERM.
func TestSystemdNotifications(t *testing.T) {
	n := newStoppedNet(t, 1)
	h := n.Hosts[0]
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msgs := make(chan string, 100)
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:k])
		}
	}()
	h.Env = []string{"NOTIFY_SOCKET=" + path, "WATCHDOG_USEC=400000"} // WatchdogSec=400ms: a ping every 200 ms
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The start's STATUS lines, then READY=1, then the pings.
	var got []string
	deadline := time.After(5 * time.Second)
	pings := 0
	for pings < 3 {
		select {
		case m := <-msgs:
			got = append(got, m)
			if m == "WATCHDOG=1" {
				pings++
			}
		case <-deadline:
			t.Fatalf("notifications so far: %q; want READY=1 and 3 watchdog pings", got)
		}
	}
	ready := slices.IndexFunc(got, func(m string) bool { return strings.HasPrefix(m, "READY=1\nSTATUS=ready: ") })
	if ready < 0 {
		t.Fatalf("no READY=1 in %q", got)
	}
	for _, want := range []string{"STATUS=checking the configuration and this host", "STATUS=connecting to etcd", "STATUS=registering this host and starting its networks"} {
		if i := slices.Index(got, want); i < 0 || i > ready {
			t.Errorf("%q not sent before READY=1: %q", want, got)
		}
	}
	if first := slices.Index(got, "WATCHDOG=1"); first < ready {
		t.Errorf("the watchdog was pinged before READY=1: %q", got)
	}
	// The health endpoints beside /metrics say the same.
	for path, want := range map[string]string{"/healthz": "ok\n", "/readyz": "ready\n"} {
		code, body := httpGet(t, h, "127.0.0.1:9476", path)
		if code != 200 || body != want {
			t.Errorf("GET %s: %d %q; want 200 %q", path, code, body, want)
		}
	}
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case m := <-msgs:
			if m == "STOPPING=1\nSTATUS=stopping" {
				return
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no STOPPING=1 after SIGTERM")
		}
	}
}

// httpGet makes a GET of path at addr from inside host h's namespace and
// returns the status code and body; it fails the test when it cannot.
func httpGet(t *testing.T, h *simnet.Host, addr, path string) (int, string) {
	t.Helper()
	code, body, err := tryGet(h, addr, path)
	if err != nil {
		t.Fatal(err)
	}
	return code, body
}

// tryGet makes a GET of path at addr from inside host h's namespace.
func tryGet(h *simnet.Host, addr, path string) (int, string, error) {
	var conn net.Conn
	if err := h.InNS(func() error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	}); err != nil {
		return 0, "", fmt.Errorf("%s: dial %s: %w", h.Name, addr, err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, addr)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s: %w", path, err)
	}
	return resp.StatusCode, string(body), nil
}

// TestReadyzSaysWhatIsMissing: with host 1, which runs the embedded etcd,
// stopped, host 2's /readyz answers 503 naming etcd and the network that
// can no longer be kept (its passes cannot read etcd), while /healthz
// stays 200: its loops move.
func TestReadyzSaysWhatIsMissing(t *testing.T) {
	n := newNet(t, 2)
	h1, h2 := n.Hosts[0], n.Hosts[1]
	// Ready to serve ADD comes before gossip has joined the other host,
	// which /readyz also wants: wait for it.
	eventually(t, 10*time.Second, "host 2's /readyz with both hosts up", func() error {
		if code, body := httpGet(t, h2, "127.0.0.1:9476", "/readyz"); code != 200 {
			return fmt.Errorf("%d %q", code, body)
		}
		return nil
	})
	if err := h1.Stop(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "host 2's /readyz naming etcd and the degraded network", func() error {
		code, body := httpGet(t, h2, "127.0.0.1:9476", "/readyz")
		if code != 503 || !strings.Contains(body, "etcd: ") || !strings.Contains(body, "network "+n.Network.Name+": degraded: ") {
			return fmt.Errorf("%d %q", code, body)
		}
		return nil
	})
	if code, body := httpGet(t, h2, "127.0.0.1:9476", "/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz with etcd down: %d %q; want 200: the loops still move", code, body)
	}
}
