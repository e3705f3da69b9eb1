// Package mesh is the health mesh: each host probes every peer of every
// network across the overlay itself (ICMP echo to the peer's gateway
// address in the network, which only the VXLAN path reaches), with a
// small packet and one of the network's full MTU that may not be
// fragmented, so that a fault on one pair of hosts (the VXLAN port
// blocked between them, a path MTU below the overlay's, an offload that
// corrupts encapsulated packets) shows as that pair's state. Probes are
// spread evenly over time within a budget: a host sends at most
// Config.Rate pairs of probes per second whatever the number of peers.
package mesh

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/overlaynet/overlay/overlay"
)

// Target is one peer of one network to probe.
type Target struct {
	// Network is the network's name.
	Network string
	// Peer is the peer's host ID.
	Peer overlay.HostID
	// Addr is the peer's gateway address in the network: reached only
	// across the overlay.
	Addr netip.Addr
	// MTU is the network's MTU on this host: the size of the large
	// probe.
	MTU int
}

// Pinger sends one ICMP echo request of size bytes (IP header included)
// that may not be fragmented, and waits for its reply until ctx is done.
// A probe that got no answer in time fails with an error wrapping
// context.DeadlineExceeded: it is lost; any other error is one of
// sending.
type Pinger interface {
	Ping(ctx context.Context, dst netip.Addr, size int) (time.Duration, error)
}

// SmallSize is the size of the small probe: a default ping's.
const SmallSize = 84

// lossesDown is how many probes in a row must be lost before a pair
// counts as down: one lost packet is not a fault.
const lossesDown = 2

// State is what the mesh knows of one pair of this host and a peer.
type State struct {
	Target
	// Probed is when the pair was last probed; zero before its first
	// probe has ended.
	Probed time.Time
	// Reachable is whether small probes are answered (fewer than 2 in a
	// row lost); MTUOK whether full-MTU probes are.
	Reachable, MTUOK bool
	// RTT is the round trip of the last small probe answered.
	RTT time.Duration
	// Since is when Reachable or MTUOK last changed, or the first probe
	// ended.
	Since time.Time
	// Err is why the last probe failed, if it did.
	Err string

	losses, mtuLosses int
	// decided is whether the pair has a state: its first answer came,
	// or two probes in a row were lost.
	decided bool
}

// Word names the pair's state: "unknown" (no answer yet, and not two
// probes lost in a row), "unreachable"
// (small probes lost), "mtu" (small probes answered, full-MTU ones lost)
// or "reachable".
func (s State) Word() string {
	switch {
	case !s.decided:
		return "unknown"
	case !s.Reachable:
		return "unreachable"
	case !s.MTUOK:
		return "mtu"
	}
	return "reachable"
}

// Config says how often to probe.
type Config struct {
	// Interval is how often each pair is probed, when the budget allows.
	Interval time.Duration
	// Rate is the budget: pairs probed per second at most (each pair is
	// a small and a large probe). With more pairs than Interval*Rate,
	// each is probed every pairs/Rate seconds instead.
	Rate float64
	// Timeout is how long a probe waits for its answer.
	Timeout time.Duration
	// Log receives the changes of a pair's state.
	Log *slog.Logger
}

// Defaults of Config.
const (
	DefaultInterval = 10 * time.Second
	DefaultRate     = 20
	DefaultTimeout  = 2 * time.Second
)

// Counts are the probes sent since the start, by size ("small",
// "large") and result ("ok", "lost", "error").
type Counts map[[2]string]uint64

// Prober probes the targets it is given. It is safe for concurrent use.
type Prober struct {
	cfg     Config
	targets func() []Target
	ping    Pinger

	mu     sync.Mutex
	states map[key]*State
	counts Counts
}

type key struct {
	network string
	peer    overlay.HostID
}

// New returns a prober of the targets that targets returns (read again
// once per round), pinging through ping.
func New(cfg Config, targets func() []Target, ping Pinger) *Prober {
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Rate <= 0 {
		cfg.Rate = DefaultRate
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Prober{cfg: cfg, targets: targets, ping: ping, states: make(map[key]*State), counts: make(Counts)}
}

// Gap returns the time between two pairs' probes with n pairs: Interval
// spread over them, but never less than the budget allows.
func (p *Prober) Gap(n int) time.Duration {
	if n <= 0 {
		return p.cfg.Interval
	}
	return max(p.cfg.Interval/time.Duration(n), time.Duration(float64(time.Second)/p.cfg.Rate))
}

// Run probes the targets one pair at a time, evenly spread, until ctx is
// done, and returns ctx's error. A pair whose probe is still waiting for
// its answer is not probed again.
func (p *Prober) Run(ctx context.Context) error {
	var (
		list     []Target
		next     int
		inFlight = make(map[key]bool)
		mu       sync.Mutex // guards inFlight
		wg       sync.WaitGroup
	)
	defer wg.Wait()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		if next >= len(list) {
			list, next = p.round(), 0
		}
		t.Reset(p.Gap(len(list)))
		if len(list) == 0 {
			continue
		}
		tg := list[next]
		next++
		k := key{tg.Network, tg.Peer}
		mu.Lock()
		busy := inFlight[k]
		inFlight[k] = true
		mu.Unlock()
		if busy {
			continue
		}
		wg.Go(func() {
			p.probe(ctx, tg)
			mu.Lock()
			delete(inFlight, k)
			mu.Unlock()
		})
	}
}

// round returns the targets of a new round, sorted, and forgets the
// pairs no longer among them.
func (p *Prober) round() []Target {
	list := slices.Clone(p.targets())
	slices.SortFunc(list, func(a, b Target) int {
		return cmp.Or(cmp.Compare(a.Network, b.Network), cmp.Compare(a.Peer, b.Peer))
	})
	keep := make(map[key]bool, len(list))
	for _, tg := range list {
		keep[key{tg.Network, tg.Peer}] = true
	}
	p.mu.Lock()
	for k := range p.states {
		if !keep[k] {
			delete(p.states, k)
		}
	}
	p.mu.Unlock()
	return list
}

// probe sends a pair's small and large probes at once and records what
// came back.
func (p *Prober) probe(parent context.Context, tg Target) {
	ctx, cancel := context.WithTimeout(parent, p.cfg.Timeout)
	defer cancel()
	type answer struct {
		rtt time.Duration
		err error
	}
	large := make(chan answer, 1)
	go func() {
		rtt, err := p.ping.Ping(ctx, tg.Addr, max(tg.MTU, SmallSize))
		large <- answer{rtt, err}
	}()
	rtt, err := p.ping.Ping(ctx, tg.Addr, SmallSize)
	l := <-large
	if parent.Err() != nil {
		return // stopping: nothing was learnt
	}
	p.Record(tg, rtt, err, l.err, time.Now())
}

// result names a probe's outcome for Counts.
func result(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, context.DeadlineExceeded):
		return "lost"
	}
	return "error"
}

// Record updates the pair's state with the answers to one probe of it at
// now (smallErr and largeErr nil when answered, rtt the small probe's
// round trip): what Run does with each probe it sends.
func (p *Prober) Record(tg Target, rtt time.Duration, smallErr, largeErr error, now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.counts[[2]string{"small", result(smallErr)}]++
	p.counts[[2]string{"large", result(largeErr)}]++
	k := key{tg.Network, tg.Peer}
	st, ok := p.states[k]
	if !ok {
		st = &State{}
		p.states[k] = st
	}
	before := *st
	st.Target = tg
	st.Err = ""
	if smallErr == nil {
		st.losses, st.RTT, st.Reachable = 0, rtt, true
	} else {
		st.losses++
		st.Err = smallErr.Error()
		if st.losses >= lossesDown {
			st.Reachable = false
		}
	}
	if largeErr == nil {
		st.mtuLosses, st.MTUOK = 0, true
	} else {
		st.mtuLosses++
		if st.Err == "" {
			st.Err = largeErr.Error()
		}
		if st.mtuLosses >= lossesDown {
			st.MTUOK = false
		}
	}
	st.Probed = now
	if !st.decided && (smallErr == nil || st.losses >= lossesDown) {
		// The first answer, or the second loss, decides; a full-MTU
		// probe not yet answered twice does not hold it up.
		st.decided = true
		if smallErr == nil && largeErr != nil && st.mtuLosses < lossesDown {
			st.MTUOK = true
		}
	}
	if !ok || before.Reachable != st.Reachable || before.MTUOK != st.MTUOK || before.decided != st.decided {
		st.Since = now
	}
	if was, is := before.Word(), st.Word(); ok && was != is && (was != "unknown" || is != "reachable") {
		lvl := slog.LevelWarn
		if is == "reachable" {
			lvl = slog.LevelInfo
		}
		p.cfg.Log.Log(context.Background(), lvl, "health mesh: a peer's state changed", "network", tg.Network, "peer", tg.Peer,
			"addr", tg.Addr, "state", is, "was", was, "err", st.Err)
	}
}

// States returns the state of every pair probed at least once (those
// not decided yet say "unknown"), sorted by network and peer.
func (p *Prober) States() []State {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]State, 0, len(p.states))
	for _, st := range p.states {
		out = append(out, *st)
	}
	slices.SortFunc(out, func(a, b State) int {
		return cmp.Or(cmp.Compare(a.Network, b.Network), cmp.Compare(a.Peer, b.Peer))
	})
	return out
}

// Counts returns the probes sent since the start, by size and result.
func (p *Prober) Counts() Counts {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(Counts, len(p.counts))
	for k, v := range p.counts {
		out[k] = v
	}
	return out
}
