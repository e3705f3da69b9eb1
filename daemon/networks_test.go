package daemon

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/mesh"
)

// fakeNetwork is a network runtime that records what the set does to it.
type fakeNetwork struct {
	def    overlay.Network
	events *eventLog
	last   atomic.Int64 // LastPass, in Unix nanoseconds
}

func (f *fakeNetwork) Run(ctx context.Context) error {
	<-ctx.Done()
	return ctx.Err()
}
func (f *fakeNetwork) Attacher() attach.Attacher { return fakeAttacher(f.def.Name) }
func (f *fakeNetwork) Kick()                     { f.events.add("kick " + f.def.Name) }
func (f *fakeNetwork) LastPass() time.Time       { return time.Unix(0, f.last.Load()) }
func (f *fakeNetwork) Remove(ctx context.Context) {
	f.events.add("remove " + f.def.Name + " " + f.def.ID)
}
func (f *fakeNetwork) Close() { f.events.add("close " + f.def.Name + " " + f.def.ID) }
func (f *fakeNetwork) Inspect(context.Context) ctlapi.NetworkStatus {
	return ctlapi.NetworkStatus{Name: f.def.Name}
}
func (f *fakeNetwork) Doctor(context.Context) []ctlapi.Finding { return nil }
func (f *fakeNetwork) MeshTargets() []mesh.Target              { return nil }
func (f *fakeNetwork) Release(context.Context, netip.Addr, bool) (ctlapi.ReleaseResponse, error) {
	return ctlapi.ReleaseResponse{}, errors.New("fake")
}

type eventLog struct {
	mu     sync.Mutex
	events []string
}

func (l *eventLog) add(e string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *eventLog) has(e string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Contains(l.events, e)
}

func (l *eventLog) count(e string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, x := range l.events {
		if x == e {
			n++
		}
	}
	return n
}

// fakeEtcd is the list of networks and whether it can be read.
type fakeEtcd struct {
	mu      sync.Mutex
	defs    []overlay.Network
	err     error
	failing map[string]int // starts of a network that fail before one succeeds
	swept   [][]overlay.Network
}

func (f *fakeEtcd) set(defs ...overlay.Network) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.defs = defs
}

func (f *fakeEtcd) list(ctx context.Context) ([]overlay.Network, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	return slices.Clone(f.defs), nil
}

func testDef(name, id string) overlay.Network {
	return overlay.Network{Name: name, ID: id, CIDR: netip.MustParsePrefix("10.0.0.0/16"), BlockBits: 26, VNI: 1, Port: 4789}
}

// passedAt is when the fake networks' last pass ended.
var passedAt = time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)

func newTestSet(t *testing.T) (*networkSet, *fakeEtcd, *eventLog) {
	t.Helper()
	store := &fakeEtcd{failing: map[string]int{}}
	events := &eventLog{}
	start := func(ctx context.Context, n overlay.Network) (network, error) {
		store.mu.Lock()
		fail := store.failing[n.Name] > 0
		if fail {
			store.failing[n.Name]--
		}
		store.mu.Unlock()
		if fail {
			events.add("fail " + n.Name)
			return nil, errors.New("lock held")
		}
		events.add("start " + n.Name + " " + n.ID)
		f := &fakeNetwork{def: n, events: events}
		f.last.Store(passedAt.UnixNano())
		return f, nil
	}
	sweep := func(_ context.Context, defs []overlay.Network) {
		store.mu.Lock()
		defer store.mu.Unlock()
		store.swept = append(store.swept, defs)
	}
	s := newNetworkSet(store.list, start, sweep, time.Hour, 10*time.Millisecond, slog.New(slog.NewTextHandler(io.Discard, nil)))
	return s, store, events
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestNetworkSet: the set follows the list of networks in etcd: it
// starts the new ones, stops and removes the deleted ones (and one
// defined anew under its name), keeps everything when the list cannot be
// read, retries a start that failed, and on stop closes every runtime
// without removing it.
func TestNetworkSet(t *testing.T) {
	s, store, events := newTestSet(t)
	store.set(testDef("a", "1"), testDef("b", "2"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	defs, _ := store.list(ctx)
	s.Start(ctx, defs)
	// Start returns once every network has started.
	if !events.has("start a 1") || !events.has("start b 2") {
		t.Fatalf("after Start: %v", events.events)
	}
	if h, _ := s.Lookup("a"); h == nil {
		t.Fatal("no handler for a")
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()

	store.set(testDef("b", "2"), testDef("c", "3"))
	s.Kick()
	eventually(t, "a removed and c started", func() bool {
		return events.has("remove a 1") && events.has("close a 1") && events.has("start c 3")
	})
	if h, known := s.Lookup("a"); h != nil || known {
		t.Fatal("a still served after its deletion")
	}

	// b deleted and created again under its name: a new runtime.
	store.set(testDef("b", "4"), testDef("c", "3"))
	s.Kick()
	eventually(t, "b replaced", func() bool { return events.has("remove b 2") && events.has("start b 4") })

	// etcd cannot be read: nothing stops.
	store.mu.Lock()
	store.err = errors.New("etcd down")
	store.mu.Unlock()
	s.Kick()
	time.Sleep(20 * time.Millisecond)
	if events.has("remove c 3") || events.has("close c 3") {
		t.Fatal("a network was stopped because etcd could not be read")
	}
	store.mu.Lock()
	store.err = nil
	store.failing["d"] = 2
	store.mu.Unlock()

	// A network that fails to start is tried again.
	store.set(testDef("b", "4"), testDef("c", "3"), testDef("d", "5"))
	s.Kick()
	eventually(t, "d started after two failures", func() bool { return events.has("start d 5") })
	if n := events.count("fail d"); n != 2 {
		t.Fatalf("d failed %d times, want 2", n)
	}

	// d's runtime joins the set just after its start is recorded: kick
	// until every one has been.
	eventually(t, "every reconciler kicked", func() bool {
		s.KickAll()
		return events.has("kick b") && events.has("kick c") && events.has("kick d")
	})

	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v", err)
	}
	for _, e := range []string{"close b 4", "close c 3", "close d 5"} {
		if !events.has(e) {
			t.Errorf("on stop: %q missing from %v", e, events.events)
		}
	}
	for _, e := range []string{"remove b 4", "remove c 3", "remove d 5"} {
		if events.has(e) {
			t.Errorf("stopping overlayd removed a network: %q", e)
		}
	}
	// The host-wide state is converged to the networks listed.
	store.mu.Lock()
	last := store.swept[len(store.swept)-1]
	store.mu.Unlock()
	if len(last) != 3 || last[0].Name != "b" || last[1].Name != "c" || last[2].Name != "d" {
		t.Errorf("last converge was given %v", last)
	}
}

// fakeAttacher is the attachment service of a fake network: it says
// which network it is in every answer.
type fakeAttacher string

func (f fakeAttacher) err() error { return errors.New("fake " + string(f)) }
func (f fakeAttacher) Allocate(context.Context, attach.Request) (attach.Attachment, error) {
	return attach.Attachment{}, f.err()
}
func (f fakeAttacher) Flush(context.Context) error                  { return f.err() }
func (f fakeAttacher) Detach(context.Context, attach.Request) error { return f.err() }
func (f fakeAttacher) Check(context.Context, attach.Request) (attach.Attachment, error) {
	return attach.Attachment{}, f.err()
}
func (f fakeAttacher) Status(context.Context) (attach.Status, error) { return attach.Status{}, f.err() }
func (f fakeAttacher) GC(context.Context, []overlay.AttachmentKey) ([]overlay.AttachmentKey, error) {
	return nil, f.err()
}
func (f fakeAttacher) Holder(context.Context, netip.Addr) (overlay.Allocation, error) {
	return overlay.Allocation{}, f.err()
}
func (f fakeAttacher) Release(context.Context, netip.Addr, bool) (overlay.AttachmentKey, bool, error) {
	return overlay.AttachmentKey{}, false, f.err()
}
func (f fakeAttacher) Allocations(context.Context) ([]overlay.Allocation, error) { return nil, f.err() }

// TestServiceThroughTheSet: the attachment service hands a request to the
// set's network, and the CNI adapter turns the service's kinds of failure
// into CNI codes: an unknown network is code 7, one etcd knows but this
// host does not serve yet code 11.
func TestServiceThroughTheSet(t *testing.T) {
	ctx := context.Background()
	s, store, _ := newTestSet(t)
	store.set(testDef("a", "1"))
	defs, _ := store.list(ctx)
	s.Start(ctx, defs)
	svc := attach.NewService(nil)
	svc.Serve(s, func(_ context.Context, name string) (bool, error) { return name == "fresh", nil })
	h := cniHandler{svc}
	req := cnirpc.Request{Network: "a", ContainerID: "c", IfName: "eth0"}
	if _, err := h.Add(ctx, req); err == nil || !strings.Contains(err.Error(), "fake a") {
		t.Fatalf("ADD of a = %v; want a's answer", err)
	}
	req.Network = "nope"
	if _, err := h.Add(ctx, req); code(err) != cnirpc.CodeInvalidNetwork || !strings.Contains(err.Error(), "networks in etcd: a") {
		t.Fatalf("ADD of an unknown network = %v, want code 7 naming a", err)
	}
	req.Network = "fresh"
	if _, err := h.Add(ctx, req); code(err) != cnirpc.CodeTryAgainLater {
		t.Fatalf("ADD of a network just created = %v, want code 11", err)
	}
}

func code(err error) uint {
	var e *cnirpc.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// TestNetworkSetStalled: the set names the networks whose reconcile loop
// has ended no pass for too long, which stops the watchdog's pings.
func TestNetworkSetStalled(t *testing.T) {
	s, store, _ := newTestSet(t)
	store.set(testDef("a", "1"), testDef("b", "2"))
	ctx := context.Background()
	defs, _ := store.list(ctx)
	s.Start(ctx, defs)
	if err := s.Stalled(passedAt.Add(20*time.Second), 20*time.Second); err != nil {
		t.Fatalf("Stalled at the limit: %v; want nil", err)
	}
	s.mu.Lock()
	s.nets["b"].net.(*fakeNetwork).last.Store(passedAt.Add(15 * time.Second).UnixNano())
	s.mu.Unlock()
	err := s.Stalled(passedAt.Add(21*time.Second), 20*time.Second)
	if err == nil || !strings.Contains(err.Error(), "network a ") || strings.Contains(err.Error(), "b") {
		t.Fatalf("Stalled with a stuck = %v; want a named, not b", err)
	}
}
