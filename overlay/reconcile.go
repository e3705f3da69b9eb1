package overlay

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/overlaynet/overlay/internal/backoff"
)

// DefaultResyncInterval is how often a reconciler compares desired and
// kernel state when nothing has changed: the bound on how long a device
// deleted by hand stays deleted.
const DefaultResyncInterval = 5 * time.Second

// retryInterval is the longest a reconciler waits to try again after a
// failed pass; retryJitter spreads the wait down to half of it, so that
// hosts failed by the same etcd outage do not retry in lockstep.
const (
	retryInterval = time.Second
	retryJitter   = 0.5
)

// ownersTimeout bounds the read of block ownership in a pass (or the
// resync interval, when that is shorter). The etcd
// client waits for a connection rather than failing; without a bound, an
// etcd outage would stall the loop instead of falling back to the last
// ownership it read.
const ownersTimeout = 3 * time.Second

// Local is what a reconciler knows about its own host.
type Local struct {
	// Host is this host's ID.
	Host HostID
	// Underlay is this host's underlay address.
	Underlay netip.Addr
	// UnderlayLink is the name of the underlay interface.
	UnderlayLink string
	// MTU is the MTU of the overlay devices.
	MTU int
	// VTEPMAC is the MAC address of this host's VXLAN devices.
	VTEPMAC net.HardwareAddr
	// BridgeMAC is the MAC address of the network's bridge on this host.
	BridgeMAC net.HardwareAddr
}

// Disagreement is a field of a live member's gossip metadata that
// differs from what the store says of it. The member is programmed (or
// not) from the store alone; the gossip value is ignored.
type Disagreement struct {
	// Host is the member, as it names itself over gossip.
	Host HostID
	// Field is what differs: "host record" (the store knows no such
	// host), "underlay" or "vtep-mac". Blocks are not gossiped: their
	// owners are in the store alone.
	Field string
	// Gossip is the member's value, Store the store's ("" for none).
	Gossip, Store string
}

// String describes d for a log line.
func (d Disagreement) String() string {
	return fmt.Sprintf("%s: gossip says %q, the store %q", d.Field, d.Gossip, d.Store)
}

// Desired computes the dataplane configuration of network n from the
// store alone: the local blocks are those owners assigns to local.Host,
// and every other host that owns blocks and has a host record is a peer,
// reached at the underlay address and VTEP MAC of its record, with a route
// per block. A host that is down keeps its entries as long as it owns
// blocks: its containers may still forward. When several records claim one
// underlay address, the latest registered wins, and a record claiming this
// host's own underlay address is left out.
//
// alive are the members gossip says are up. They change nothing in the
// configuration: what their metadata says that differs from the store is
// returned as disagreements. Desired is a pure function.
func Desired(n Network, local Local, owners map[netip.Prefix]HostID, hosts []HostInfo, alive []Member) (DataplaneConfig, []Disagreement) {
	cfg := DataplaneConfig{
		Network:      n,
		Underlay:     local.Underlay,
		UnderlayLink: local.UnderlayLink,
		MTU:          local.MTU,
		VTEPMAC:      local.VTEPMAC,
		BridgeMAC:    local.BridgeMAC,
	}
	blocks := make(map[HostID][]netip.Prefix)
	for b, h := range owners {
		if h == local.Host {
			cfg.Blocks = append(cfg.Blocks, b)
		} else {
			blocks[h] = append(blocks[h], b)
		}
	}
	slices.SortFunc(cfg.Blocks, comparePrefix)

	records := make(map[HostID]HostInfo, len(hosts))
	byUnderlay := make(map[netip.Addr]HostInfo)
	for _, h := range hosts {
		records[h.Host] = h
		if h.Host == local.Host || len(blocks[h.Host]) == 0 || !h.Underlay.Is4() || len(h.VTEPMAC) != 6 || h.Underlay == local.Underlay {
			continue
		}
		if prev, ok := byUnderlay[h.Underlay]; ok && !laterRecord(h, prev) {
			continue
		}
		byUnderlay[h.Underlay] = h
	}
	for _, h := range byUnderlay {
		p := Peer{Host: h.Host, Underlay: h.Underlay, VTEPMAC: h.VTEPMAC, Blocks: blocks[h.Host]}
		slices.SortFunc(p.Blocks, comparePrefix)
		cfg.Peers = append(cfg.Peers, p)
	}
	slices.SortFunc(cfg.Peers, func(a, b Peer) int { return cmp.Compare(a.Host, b.Host) })

	var disagree []Disagreement
	for _, m := range alive {
		if m.Host == local.Host {
			continue
		}
		rec, ok := records[m.Host]
		if !ok {
			disagree = append(disagree, Disagreement{Host: m.Host, Field: "host record", Gossip: m.Underlay.String()})
			continue
		}
		if m.Underlay != rec.Underlay {
			disagree = append(disagree, Disagreement{Host: m.Host, Field: "underlay", Gossip: m.Underlay.String(), Store: rec.Underlay.String()})
		}
		if !bytes.Equal(m.VTEPMAC, rec.VTEPMAC) {
			disagree = append(disagree, Disagreement{Host: m.Host, Field: "vtep-mac", Gossip: m.VTEPMAC.String(), Store: rec.VTEPMAC.String()})
		}
	}
	slices.SortFunc(disagree, func(a, b Disagreement) int {
		return cmp.Or(cmp.Compare(a.Host, b.Host), cmp.Compare(a.Field, b.Field), cmp.Compare(a.Gossip, b.Gossip))
	})
	return cfg, disagree
}

// laterRecord reports whether a was registered after b, breaking a tie by
// host ID so that every host picks the same one.
func laterRecord(a, b HostInfo) bool {
	if c := a.Registered.Compare(b.Registered); c != 0 {
		return c > 0
	}
	return a.Host > b.Host
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// Status is what a reconciler reached on its last pass.
type Status struct {
	// Passes counts completed passes, failed ones included.
	Passes uint64
	// Failures counts passes whose Set or Owners failed.
	Failures uint64
	// LastPass is when the last pass ended.
	LastPass time.Time
	// Took is how long the last pass took: its reads of the store and the
	// dataplane's convergence.
	Took time.Duration
	// LastErr is the error of the last pass, nil when it succeeded.
	LastErr error
	// LastSuccess is when the last pass that succeeded ended; zero
	// before the first.
	LastSuccess time.Time
	// Config is the configuration last given to the dataplane.
	Config DataplaneConfig
	// Disagreements are what the live members' gossip said on the last
	// pass that differs from the store, and was ignored.
	Disagreements []Disagreement
	// DisagreeingMembers counts, since the reconciler started, each time
	// a live member's gossip came to differ from the store in a new way:
	// a member is counted (and logged) once per disagreement, not once
	// per pass.
	DisagreeingMembers uint64
}

// Reconciler keeps one network's dataplane converged with what the store
// says: block ownership and the host records. Gossip only wakes it: its
// members' metadata never changes what is programmed, and where it differs
// from the store it is logged at WARN, once per member and disagreement,
// and counted. It is level-triggered: each pass computes the whole desired
// state and hands it to the dataplane, so a failed pass is repaired by the
// next one. Its methods are safe for concurrent use.
type Reconciler struct {
	// OnPass, when set before Run, is told how long each pass took and
	// its error, after its status is recorded. It must not block.
	OnPass func(took time.Duration, err error)

	network   Network
	local     Local
	owners    BlockOwners
	hosts     HostDirectory
	members   Membership
	dataplane Dataplane
	interval  time.Duration
	log       *slog.Logger

	kick chan struct{}

	mu sync.Mutex // guards the fields below
	// lastOwners and lastHosts are the last block ownership and host
	// records read from the store; they are used while the store cannot
	// be read, so that an etcd outage never removes a peer.
	lastOwners map[netip.Prefix]HostID
	lastHosts  []HostInfo
	// warned holds, per member, the disagreements last logged for it.
	warned map[HostID]string
	status Status
}

// NewReconciler returns a reconciler for network n. interval is the
// resync period; zero means DefaultResyncInterval.
func NewReconciler(n Network, local Local, owners BlockOwners, hosts HostDirectory, members Membership, dp Dataplane, interval time.Duration, log *slog.Logger) *Reconciler {
	if interval <= 0 {
		interval = DefaultResyncInterval
	}
	return &Reconciler{
		network:   n,
		local:     local,
		owners:    owners,
		hosts:     hosts,
		members:   members,
		dataplane: dp,
		interval:  interval,
		log:       log.With("network", n.Name),
		kick:      make(chan struct{}, 1),
		warned:    make(map[HostID]string),
	}
}

// Kick asks for a pass as soon as possible. It never blocks: kicks that
// arrive while one is pending are merged.
func (r *Reconciler) Kick() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Status returns what the last pass reached.
func (r *Reconciler) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// Run makes a pass at once, then on every kick and every resync interval,
// until ctx is done. It returns ctx's error.
func (r *Reconciler) Run(ctx context.Context) error {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-r.kick:
		case <-timer.C:
		}
		next := r.interval
		if err := r.Pass(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			next = backoff.Jitter(retryInterval, retryJitter, rand.Float64())
			r.log.Warn("reconcile pass failed; retrying", "err", err, "retry", next)
		}
		timer.Reset(next)
	}
}

// Pass makes one reconcile pass and returns its error.
func (r *Reconciler) Pass(ctx context.Context) error {
	start := time.Now()
	// Both reads at once: a pass woken by a new block programs it one
	// round trip sooner.
	octx, cancel := context.WithTimeout(ctx, min(ownersTimeout, r.interval))
	var hosts []HostInfo
	var hostsErr error
	read := make(chan struct{})
	go func() {
		defer close(read)
		hosts, hostsErr = r.hosts.Hosts(octx)
	}()
	owners, ownersErr := r.owners.Owners(octx)
	<-read
	cancel()
	readErr := errors.Join(ownersErr, hostsErr)
	alive := r.members.Members()

	r.mu.Lock()
	if readErr != nil {
		owners, hosts = r.lastOwners, r.lastHosts
	} else {
		r.lastOwners, r.lastHosts = owners, hosts
	}
	if owners == nil {
		// Never read the store: programming now would remove every peer.
		r.status.Passes++
		r.status.Failures++
		r.status.LastErr = readErr
		r.status.LastPass = time.Now()
		took := r.status.LastPass.Sub(start)
		r.status.Took = took
		r.mu.Unlock()
		r.observe(took, readErr)
		return readErr
	}
	cfg, disagree := Desired(r.network, r.local, owners, hosts, alive)
	fresh := r.newDisagreementsLocked(disagree)
	r.mu.Unlock()

	for _, d := range fresh {
		r.log.Warn("ignoring gossip metadata that differs from the store; the peer is programmed from its host record", "member", d[0].Host, "differs", d)
	}

	err := r.dataplane.Set(ctx, cfg)
	if err == nil && readErr != nil {
		err = readErr
	}

	r.mu.Lock()
	r.status.Passes++
	if err != nil {
		r.status.Failures++
	}
	r.status.LastErr = err
	r.status.LastPass = time.Now()
	if err == nil {
		r.status.LastSuccess = r.status.LastPass
	}
	took := r.status.LastPass.Sub(start)
	r.status.Took = took
	r.status.Config = cfg
	r.status.Disagreements = disagree
	r.mu.Unlock()
	r.observe(took, err)
	return err
}

// observe tells OnPass of a pass.
func (r *Reconciler) observe(took time.Duration, err error) {
	if r.OnPass != nil {
		r.OnPass(took, err)
	}
}

// newDisagreementsLocked returns, per member, the disagreements that
// differ from those last logged for it, counts them, and forgets members
// that agree again.
func (r *Reconciler) newDisagreementsLocked(all []Disagreement) [][]Disagreement {
	byHost := make(map[HostID][]Disagreement)
	for _, d := range all {
		byHost[d.Host] = append(byHost[d.Host], d)
	}
	var fresh [][]Disagreement
	for h, list := range byHost {
		text := fmt.Sprint(list)
		if r.warned[h] != text {
			r.warned[h] = text
			r.status.DisagreeingMembers++
			fresh = append(fresh, list)
		}
	}
	for h := range r.warned {
		if _, ok := byHost[h]; !ok {
			delete(r.warned, h)
		}
	}
	slices.SortFunc(fresh, func(a, b []Disagreement) int { return cmp.Compare(a[0].Host, b[0].Host) })
	return fresh
}
