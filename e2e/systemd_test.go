package e2e

import (
	"context"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
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
