package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// TestHostDirectoryShared: calls that arrive while a read is in flight
// are answered together by one read that starts after them, never by the
// one in flight (which may predate a record they must see); a caller that
// gives up gets its context's error at once.
func TestHostDirectoryShared(t *testing.T) {
	var reads atomic.Int32
	release := make(chan struct{})
	started := make(chan struct{}, 10)
	d := &hostDirectory{log: slog.New(slog.DiscardHandler), read: func(ctx context.Context) ([]etcd.HostRecord, error) {
		n := reads.Add(1)
		started <- struct{}{}
		<-release
		return []etcd.HostRecord{{Host: overlay.HostID(fmt.Sprintf("read%d", n)), Underlay: netip.MustParseAddr("198.18.0.1"), VTEPMAC: "02:00:00:00:00:01"}}, nil
	}}
	ctx := context.Background()
	first := make(chan []overlay.HostInfo)
	go func() {
		hosts, _ := d.Hosts(ctx)
		first <- hosts
	}()
	<-started // read 1 in flight
	const waiting = 8
	var wg sync.WaitGroup
	got := make([][]overlay.HostInfo, waiting)
	for i := range waiting {
		wg.Go(func() {
			var err error
			if got[i], err = d.Hosts(ctx); err != nil {
				t.Error(err)
			}
		})
	}
	gaveUp, cancel := context.WithCancel(ctx)
	errc := make(chan error)
	go func() {
		_, err := d.Hosts(gaveUp)
		errc <- err
	}()
	// Every one of them queued for the next read before read 1 ends.
	for queued := 0; queued < waiting+1; {
		d.mu.Lock()
		if d.next != nil {
			queued = d.next.waiting
		}
		d.mu.Unlock()
		runtime.Gosched()
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("a caller that gave up: %v; want context.Canceled", err)
	}
	release <- struct{}{}
	if h := <-first; len(h) != 1 || h[0].Host != "read1" {
		t.Fatalf("first caller got %v; want read1", h)
	}
	<-started // read 2, for all the others
	release <- struct{}{}
	wg.Wait()
	for i, h := range got {
		if len(h) != 1 || h[0].Host != "read2" {
			t.Errorf("caller %d got %v; want read2, which started after it arrived", i, h)
		}
	}
	if k := d.Known(); len(k) != 1 || k[0] != "read2" {
		t.Errorf("Known = %v, want the last read's [read2]", k)
	}
	if n := reads.Load(); n != 2 {
		t.Fatalf("%d reads for %d callers; want 2", n, waiting+2)
	}
	// Idle again: a later call makes a read of its own.
	go func() { <-started; release <- struct{}{} }()
	if h, err := d.Hosts(ctx); err != nil || h[0].Host != "read3" {
		t.Fatalf("a later call: %v, %v; want read3", h, err)
	}
}
