package mesh

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/overlaynet/overlay/overlay"
)

// fakePinger answers small probes unless the address is down, and large
// ones unless it is down or its MTU is broken.
type fakePinger struct {
	mu     sync.Mutex
	down   map[netip.Addr]bool
	badMTU map[netip.Addr]bool
	sent   map[netip.Addr]int
	sizes  map[int]int
	delay  time.Duration
}

func newFake() *fakePinger {
	return &fakePinger{down: map[netip.Addr]bool{}, badMTU: map[netip.Addr]bool{}, sent: map[netip.Addr]int{}, sizes: map[int]int{}}
}

func (f *fakePinger) Ping(ctx context.Context, dst netip.Addr, size int) (time.Duration, error) {
	f.mu.Lock()
	f.sent[dst]++
	f.sizes[size]++
	lost := f.down[dst] || size > SmallSize && f.badMTU[dst]
	delay := f.delay
	f.mu.Unlock()
	if lost {
		<-ctx.Done()
		return 0, fmt.Errorf("no answer: %w", ctx.Err())
	}
	select {
	case <-time.After(delay):
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return time.Millisecond, nil
}

func (f *fakePinger) count(a netip.Addr) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sent[a]
}

func target(peer string, last byte) Target {
	return Target{Network: "red", Peer: overlay.HostID("host-" + peer), Addr: netip.AddrFrom4([4]byte{10, 1, last, 1}), MTU: 1450}
}

func TestGap(t *testing.T) {
	p := New(Config{Interval: 10 * time.Second, Rate: 20}, nil, nil)
	for _, c := range []struct {
		pairs int
		want  time.Duration
	}{{0, 10 * time.Second}, {1, 10 * time.Second}, {10, time.Second}, {200, 50 * time.Millisecond}, {1000, 50 * time.Millisecond}} {
		if got := p.Gap(c.pairs); got != c.want {
			t.Errorf("Gap(%d) = %v, want %v", c.pairs, got, c.want)
		}
	}
	// At 1000 peers, each is probed every 50 s: the budget, not the
	// interval, sets the pace.
	if per := p.Gap(1000) * 1000; per != 50*time.Second {
		t.Errorf("a pair's period at 1000 peers = %v", per)
	}
}

// TestStates: a pair turns unreachable after two small probes lost in a
// row, "mtu" when only full-size probes are lost, and reachable again at
// its first answer; every probe is counted.
func TestStates(t *testing.T) {
	p := New(Config{}, nil, nil)
	tg := target("b", 2)
	lost := fmt.Errorf("no answer: %w", context.DeadlineExceeded)
	now := time.Unix(1000, 0)
	step := func(small, large error) State {
		now = now.Add(time.Second)
		p.Record(tg, 3*time.Millisecond, small, large, now)
		return p.States()[0]
	}
	if st := step(nil, nil); st.Word() != "reachable" || st.RTT != 3*time.Millisecond || !st.Since.Equal(now) {
		t.Fatalf("first answer: %+v", st)
	}
	first := now
	if st := step(lost, lost); st.Word() != "reachable" || !st.Since.Equal(first) || st.Err == "" {
		t.Fatalf("one loss: %+v; want still reachable, with the error", st)
	}
	if st := step(lost, lost); st.Word() != "unreachable" || !st.Since.Equal(now) {
		t.Fatalf("two losses: %+v", st)
	}
	step(nil, lost)
	if st := p.States()[0]; st.Word() != "mtu" {
		t.Fatalf("small answered, large lost twice: %+v", st)
	}
	if st := step(nil, nil); st.Word() != "reachable" {
		t.Fatalf("answered again: %+v", st)
	}
	c := p.Counts()
	if c[[2]string{"small", "ok"}] != 3 || c[[2]string{"small", "lost"}] != 2 || c[[2]string{"large", "lost"}] != 3 || c[[2]string{"large", "ok"}] != 2 {
		t.Errorf("counts %v", c)
	}
	p.Record(tg, 0, errors.New("send: network is unreachable"), nil, now)
	if c := p.Counts(); c[[2]string{"small", "error"}] != 1 {
		t.Errorf("an error sending is not counted as one: %v", c)
	}

	// A new pair whose first probe is lost is not decided yet; whose
	// first small probe is answered is reachable, its MTU given the
	// benefit of the doubt until two full-size probes are lost.
	fresh := target("c", 3)
	p.Record(fresh, 0, lost, lost, now)
	if st := stateOf(p, fresh); st.Word() != "unknown" {
		t.Errorf("first probe lost: %s, want unknown", st.Word())
	}
	p.Record(fresh, 0, lost, lost, now)
	if st := stateOf(p, fresh); st.Word() != "unreachable" {
		t.Errorf("two lost: %s, want unreachable", st.Word())
	}
	other := target("d", 4)
	p.Record(other, time.Millisecond, nil, lost, now)
	if st := stateOf(p, other); st.Word() != "reachable" {
		t.Errorf("small answered, one large lost: %s, want reachable", st.Word())
	}
}

func stateOf(p *Prober, tg Target) State {
	for _, st := range p.States() {
		if st.Peer == tg.Peer {
			return st
		}
	}
	return State{}
}

// TestRun: every target is probed with a small and a full-MTU probe, the
// faults show on their own pair only, pairs no longer targets are
// forgotten, and the budget holds.
func TestRun(t *testing.T) {
	f := newFake()
	b, c, d := target("b", 2), target("c", 3), target("d", 4)
	f.down[c.Addr] = true
	f.badMTU[d.Addr] = true
	var mu sync.Mutex
	targets := []Target{b, c, d}
	p := New(Config{Interval: 30 * time.Millisecond, Rate: 1000, Timeout: 20 * time.Millisecond}, func() []Target {
		mu.Lock()
		defer mu.Unlock()
		return targets
	}, f)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v", err)
		}
	}()
	want := map[string]string{"host-b": "reachable", "host-c": "unreachable", "host-d": "mtu"}
	waitFor(t, "every pair's state", func() bool {
		got := map[string]string{}
		for _, st := range p.States() {
			got[string(st.Peer)] = st.Word()
		}
		return fmt.Sprint(got) == fmt.Sprint(want)
	})
	f.mu.Lock()
	small, large := f.sizes[SmallSize], f.sizes[1450]
	f.mu.Unlock()
	if small == 0 || large == 0 {
		t.Errorf("probe sizes %v; want small ones and ones of the network's MTU", f.sizes)
	}
	// d leaves the network: it is forgotten, and no longer probed.
	mu.Lock()
	targets = []Target{b, c}
	mu.Unlock()
	waitFor(t, "d forgotten", func() bool { return len(p.States()) == 2 })
	before := f.count(d.Addr)
	time.Sleep(100 * time.Millisecond)
	if after := f.count(d.Addr); after > before+2 {
		t.Errorf("d probed %d more times after it left", after-before)
	}
}

// TestRunBudget: however many pairs, the prober starts no more than Rate
// pairs a second.
func TestRunBudget(t *testing.T) {
	f := newFake()
	var targets []Target
	for i := range 200 {
		targets = append(targets, Target{Network: "red", Peer: overlay.HostID(fmt.Sprint("p", i)), Addr: netip.AddrFrom4([4]byte{10, 1, byte(i), 1}), MTU: 1450})
	}
	p := New(Config{Interval: time.Millisecond, Rate: 50, Timeout: time.Second}, func() []Target { return targets }, f)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	p.Run(ctx)
	sent := 0
	f.mu.Lock()
	for _, n := range f.sent {
		sent += n
	}
	f.mu.Unlock()
	// 50 pairs a second for half a second: about 25 pairs, 2 probes
	// each; a scheduler that ignored the budget would send 400.
	if sent > 2*30 {
		t.Errorf("%d probes in 0.5 s at a budget of 50 pairs/s", sent)
	}
	if sent == 0 {
		t.Error("nothing probed")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// BenchmarkRound1000 is the prober's own cost at 1000 peers: one round's
// list of targets (read, sorted, pruned) and the state updates of its
// 1000 probes, without the packets.
func BenchmarkRound1000(b *testing.B) {
	targets := make([]Target, 1000)
	for i := range targets {
		targets[i] = Target{Network: "red", Peer: overlay.HostID(fmt.Sprintf("host-%04d", i)), Addr: netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 1}), MTU: 1450}
	}
	p := New(Config{}, func() []Target { return targets }, nil)
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		for _, tg := range p.round() {
			p.Record(tg, time.Millisecond, nil, nil, now)
		}
	}
}
