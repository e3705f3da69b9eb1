package daemon

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fakeSystemd is a NOTIFY_SOCKET: it collects what is sent to it.
type fakeSystemd struct {
	conn *net.UnixConn
	msgs chan string
}

func newFakeSystemd(t *testing.T) *fakeSystemd {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	f := &fakeSystemd{conn: conn, msgs: make(chan string, 1000)}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(f.msgs)
				return
			}
			f.msgs <- string(buf[:n])
		}
	}()
	return f
}

// next returns the next message, failing after a second without one.
func (f *fakeSystemd) next(t *testing.T) string {
	t.Helper()
	select {
	case m := <-f.msgs:
		return m
	case <-time.After(time.Second):
		t.Fatal("no notification within a second")
		return ""
	}
}

// TestNotifier: the start's STATUS lines, READY=1 and STOPPING=1 reach
// the NOTIFY_SOCKET as systemd expects them.
func TestNotifier(t *testing.T) {
	sd := newFakeSystemd(t)
	n := newNotifier(slog.New(slog.DiscardHandler))
	n.status("connecting to etcd at %s", "unix:///run/etcd.sock")
	n.ready("ready: 2 networks")
	n.stopping()
	for _, want := range []string{"STATUS=connecting to etcd at unix:///run/etcd.sock", "READY=1\nSTATUS=ready: 2 networks", "STOPPING=1\nSTATUS=stopping"} {
		if got := sd.next(t); got != want {
			t.Errorf("notification %q; want %q", got, want)
		}
	}
}

// TestWatchdogStopsWhileStalled: the watchdog is pinged while progress is
// made, not while a reconcile loop is stuck (so that systemd restarts
// overlayd), and again once it moves.
func TestWatchdogStopsWhileStalled(t *testing.T) {
	sd := newFakeSystemd(t)
	n := newNotifier(slog.New(slog.DiscardHandler))
	var stuck atomic.Bool
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		done <- n.watchdog(ctx, 5*time.Millisecond, func(time.Time) error {
			if stuck.Load() {
				return errors.New("the reconcile loop of network red made no pass for more than 20s")
			}
			return nil
		})
	}()
	for range 3 {
		if got := sd.next(t); got != "WATCHDOG=1" {
			t.Fatalf("while progressing: %q; want WATCHDOG=1", got)
		}
	}
	stuck.Store(true)
	// At most one ping already on its way, then the reason, then silence.
	got := sd.next(t)
	if got == "WATCHDOG=1" {
		got = sd.next(t)
	}
	if !strings.HasPrefix(got, "STATUS=stalled: ") || !strings.Contains(got, "network red") {
		t.Fatalf("once stuck: %q; want a STATUS saying what is stalled", got)
	}
	select {
	case m := <-sd.msgs:
		t.Fatalf("pinged while stuck: %q", m)
	case <-time.After(100 * time.Millisecond): // 20 intervals
	}
	stuck.Store(false)
	if got := sd.next(t); got != "WATCHDOG=1\nSTATUS=ready" {
		t.Fatalf("once moving again: %q; want WATCHDOG=1 and the status back", got)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("watchdog returned %v; want context.Canceled", err)
	}
}

// TestNotifierWithoutSystemd: outside a notify unit nothing is sent and
// nothing fails.
func TestNotifierWithoutSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := newNotifier(slog.New(slog.DiscardHandler))
	n.ready("ready")
	t.Setenv("WATCHDOG_USEC", "")
	if d, err := watchdogInterval(); d != 0 || err != nil {
		t.Fatalf("watchdogInterval without WATCHDOG_USEC = %v, %v; want 0", d, err)
	}
	t.Setenv("WATCHDOG_USEC", "60000000")
	t.Setenv("WATCHDOG_PID", "")
	if d, err := watchdogInterval(); d != 30*time.Second || err != nil {
		t.Fatalf("watchdogInterval with WatchdogSec=60s = %v, %v; want 30s", d, err)
	}
}
