package daemon

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// fakeRecord is a host's record of allocations that the test changes.
type fakeRecord struct {
	changed chan struct{}
	mu      sync.Mutex
	list    []overlay.Allocation
}

func (f *fakeRecord) Changed() <-chan struct{} { return f.changed }

func (f *fakeRecord) List(context.Context) ([]overlay.Allocation, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]overlay.Allocation(nil), f.list...), nil
}

func (f *fakeRecord) add(id string) {
	f.mu.Lock()
	f.list = append(f.list, overlay.Allocation{Key: overlay.AttachmentKey{ContainerID: id, IfName: "eth0"}})
	f.mu.Unlock()
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

// fakeCopy is etcd's copy: it records each Mirror and fails while told to.
type fakeCopy struct {
	mu    sync.Mutex
	calls []int // the length of each list copied
	fail  bool
}

func (f *fakeCopy) Mirror(_ context.Context, list []overlay.Allocation) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, len(list))
	if f.fail {
		return 0, errors.New("etcd down")
	}
	return len(list), nil
}

func (f *fakeCopy) snapshot() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]int(nil), f.calls...)
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestMirrorLoop: the mirror copies at once, folds a burst of changes into
// one copy, retries a failed copy within a second (counting each
// failure), and copies every resync interval when nothing changes.
func TestMirrorLoop(t *testing.T) {
	rec := &fakeRecord{changed: make(chan struct{}, 1)}
	cp := &fakeCopy{}
	var failures atomic.Int64
	m := &mirrorLoop{from: rec, to: cp, resync: time.Hour, failed: func() { failures.Add(1) }, log: discard()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	eventually(t, "the first copy", func() bool { return len(cp.snapshot()) == 1 && m.mirrored.Load() != 0 })

	for i := range 20 {
		rec.add(string(rune('a' + i)))
	}
	eventually(t, "the burst copied", func() bool {
		c := cp.snapshot()
		return c[len(c)-1] == 20
	})
	if n := len(cp.snapshot()); n > 3 {
		t.Fatalf("a burst of 20 changes took %d copies; want them folded", n-1)
	}

	cp.mu.Lock()
	cp.fail = true
	cp.mu.Unlock()
	rec.add("x")
	eventually(t, "two failed copies", func() bool { return failures.Load() >= 2 })
	cp.mu.Lock()
	cp.fail = false
	cp.mu.Unlock()
	before := m.mirrored.Load()
	eventually(t, "a copy after etcd came back", func() bool { return m.mirrored.Load() != before })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v", err)
	}

	// With nothing changing, the resync interval copies again.
	cp2 := &fakeCopy{}
	m = &mirrorLoop{from: &fakeRecord{changed: make(chan struct{})}, to: cp2, resync: 20 * time.Millisecond, failed: func() {}, log: discard()}
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	go m.Run(ctx)
	eventually(t, "resync copies", func() bool { return len(cp2.snapshot()) >= 3 })
}

// TestReclaimLoop: what a pass frees is counted and wakes the
// reconciler; a failed or empty pass does neither.
func TestReclaimLoop(t *testing.T) {
	var kicks atomic.Int64
	var mu sync.Mutex
	results := []func() ([]etcd.Reclaimed, error){
		func() ([]etcd.Reclaimed, error) { return nil, errors.New("etcd down") },
		func() ([]etcd.Reclaimed, error) { return nil, nil },
		func() ([]etcd.Reclaimed, error) {
			return []etcd.Reclaimed{
				{Block: netip.MustParsePrefix("10.0.0.0/26"), Owner: "gone"},
				{Block: netip.MustParsePrefix("10.0.0.64/26"), Owner: "gone"},
			}, nil
		},
	}
	calls := 0
	l := &reclaimLoop{
		reclaim: func(ctx context.Context, now time.Time) ([]etcd.Reclaimed, error) {
			mu.Lock()
			defer mu.Unlock()
			if _, ok := ctx.Deadline(); !ok {
				t.Error("a reclaim pass without a deadline")
			}
			if calls >= len(results) {
				return nil, nil
			}
			calls++
			return results[calls-1]()
		},
		interval: 5 * time.Millisecond, after: time.Hour, kick: func() { kicks.Add(1) }, log: discard(),
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go l.Run(ctx)
	eventually(t, "three passes", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return calls == len(results)
	})
	eventually(t, "the freed blocks counted", func() bool { return l.reclaimed.Load() == 2 })
	if k := kicks.Load(); k != 1 {
		t.Fatalf("%d kicks; want one, for the pass that freed blocks", k)
	}
}
