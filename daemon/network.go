package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/ipam"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/metrics"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/mesh"
	"github.com/overlaynet/overlay/overlay/vxlan"
)

// netRuntime is one network on this host: its blocks (pool), its
// allocations (alloc), its reconcile loop, its CNI handler, the mirror of
// its allocations to etcd and the reclaim of gone hosts' blocks, with
// their metrics. The host runtime starts one per network in etcd and
// stops it when the network is deleted or overlayd stops.
type netRuntime struct {
	h       *host
	network overlay.Network
	log     *slog.Logger
	lock    *netnsLock
	alloc   *local.Allocator
	pool    *etcd.Pool
	addrs   *ipam.Pool
	rec     *overlay.Reconciler
	dp      *vxlan.Linux
	local   overlay.Local
	handler *attach.Network
	metrics *metrics.Network
	// before are the allocations that existed when the runtime started:
	// those whose veth is gone are released after the orphan grace.
	before  []overlay.Allocation
	mirror  *mirrorLoop
	reclaim *reclaimLoop
	// bg bounds the work the handler leaves running (the deletions of
	// DEL); cancelled by Close.
	bg     context.Context
	stopBg context.CancelFunc
}

var _ network = (*netRuntime)(nil)

// startNetwork starts network n on host h: it takes the network's lock in
// this namespace, opens this host's record of its allocations, loads the
// blocks it holds (or claims its first), programs the dataplane once and
// makes its CNI handler. A failure releases what it took.
func (h *host) startNetwork(ctx context.Context, n overlay.Network) (_ network, err error) {
	log := h.log.With("network", n.Name)
	r := &netRuntime{h: h, network: n, log: log}
	r.bg, r.stopBg = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	// The namespace's lock keeps an overlayd with another data directory
	// off this network's devices.
	if r.lock, err = lockNetwork(n.Name); err != nil {
		return nil, err
	}
	// A record of another network of the same name: deleted and created
	// again while overlayd was down. Its containers and devices go first.
	if old, err := h.allocs.NetworkID(n.Name); err != nil {
		return nil, err
	} else if old != "" && n.ID != "" && old != n.ID {
		h.removeNetwork(ctx, n.Name, h.recorded(ctx, n.Name), "the network was deleted and created again under its name while overlayd was down: the containers of the old one are cut off; remove them")
	}
	// The host's record of the network, read whole now: a corrupt record
	// fails the start before anything changes. It allocates from the
	// pool's blocks once the pool exists (usable).
	// The blocks this host holds are read beside it (and, for a record
	// new to this network, etcd's copy of its allocations imported). The
	// host's liveness key exists by now, so no reclaim can take a block
	// after this read: what it returns is this host's.
	var usable func() []netip.Prefix
	r.pool = h.store.Pool(n, h.id)
	var blocks []netip.Prefix
	var first errgroup.Group
	first.Go(func() (err error) {
		blocks, err = r.pool.Load(ctx)
		return err
	})
	alloc, fresh, err := h.allocs.Allocator(n, h.id, func() []netip.Prefix { return usable() })
	if err == nil && fresh {
		first.Go(func() error { return importAllocations(ctx, alloc, r.pool, n, log) })
	}
	if werr := first.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		return nil, err
	}
	r.alloc = alloc
	r.addrs, err = ipam.New(ipam.Config{
		Network: n, Host: h.id, MaxBlocks: h.cfg.MaxBlocks, IdleBlock: h.cfg.IdleBlock,
		VerifyInterval: h.cfg.VerifyInterval, Log: log.With("component", "ipam"),
	}, r.pool, func(held func() []netip.Prefix) (ipam.Book, error) {
		usable = held
		return alloc, nil
	})
	if err != nil {
		return nil, err
	}
	// Containers whose block was reclaimed while this host was away keep
	// addresses another host may hand out: say so before anything else.
	r.addrs.ReportStranded(nil)
	if err := r.addrs.Ensure(ctx); err != nil {
		return nil, err
	}
	log.Info("holding blocks", "blocks", r.pool.Held(), "loaded", len(blocks))

	mtu := h.ul.MTU - vxlan.Overhead
	if n.MTU > mtu {
		log.Warn("the network's MTU is more than this host's underlay carries; using what it does", "mtu", n.MTU, "underlay-mtu", h.ul.MTU, "using", mtu)
	} else if n.MTU != 0 {
		mtu = n.MTU
	}
	// The first pass needs no gossip: peers are programmed from their
	// host records, so a restarted overlayd keeps every host that owns
	// blocks, and a registered host that is gone does not hold up the
	// start.
	localHost := overlay.Local{Host: h.id, Underlay: h.ul.Addr, UnderlayLink: h.ul.Link, MTU: mtu, VTEPMAC: h.mac, BridgeMAC: BridgeMAC(h.id, n.Name)}
	rlog := log.With("component", "reconcile")
	// A dataplane of its own: the networks' devices are apart, and one
	// network's pass never waits for another's.
	dp := vxlan.New(h.nl, h.nlNeigh, log.With("component", "dataplane"))
	r.dp, r.local = dp, localHost
	r.rec = overlay.NewReconciler(n, localHost, r.pool, h.dir, h.gossip, dp, h.cfg.ResyncInterval, rlog)
	r.metrics = h.metrics.Network(n.Name, func() metrics.NetworkStats { return r.stats(dp) })
	r.rec.OnPass = func(took time.Duration, _ error) { r.metrics.ObservePass(took) }
	if err := r.rec.Pass(ctx); err != nil {
		// Not fatal: one failing entry must not stop the network. The
		// loop retries; STATUS says "not ready" until a pass succeeds.
		log.Error("programming the dataplane failed; retrying", "err", err)
	}
	r.handler = attach.NewNetwork(r.bg, n, mtu, timedFlush{r.addrs, r.metrics.ObserveFlush}, r.rec.Status, func() int { return h.gossip.Stats().Members }, h.links, h.log.With("component", "cni"))
	before, err := r.handler.Allocations(ctx)
	if err != nil {
		log.Warn("reading this host's allocations; addresses of vanished containers stay allocated until GC", "err", err)
	}
	r.before = before
	if stale := r.handler.StaleMTU(before); len(stale) > 0 {
		var ids []string
		for k, mtu := range stale {
			ids = append(ids, fmt.Sprintf("%s (%d)", k, mtu))
		}
		slices.Sort(ids)
		log.Warn("containers created before the MTU changed keep their old MTU, and CHECK fails for them: recreate them",
			"mtu", mtu, "containers", ids)
	}
	r.mirror = &mirrorLoop{from: alloc, to: r.pool, resync: h.cfg.ResyncInterval, failed: h.metrics.MirrorFailures.Inc, log: log}
	r.reclaim = &reclaimLoop{
		reclaim: func(ctx context.Context, now time.Time) ([]etcd.Reclaimed, error) {
			return h.store.Reclaim(ctx, n, h.id, h.cfg.ReclaimAfter, now)
		},
		interval: reclaimInterval(h.cfg), after: h.cfg.ReclaimAfter, kick: r.rec.Kick, log: log,
	}
	if err := r.metrics.Register(); err != nil {
		return nil, err
	}
	return r, nil
}

// Attacher returns the network's attachment service.
func (r *netRuntime) Attacher() attach.Attacher { return r.handler }

// Kick asks the reconcile loop for a pass.
func (r *netRuntime) Kick() { r.rec.Kick() }

// LastPass returns when the reconcile loop last ended a pass.
func (r *netRuntime) LastPass() time.Time { return r.rec.Status().LastPass }

// Run runs the network's loops until ctx is done.
func (r *netRuntime) Run(ctx context.Context) error {
	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error { return r.rec.Run(ctx) })
	eg.Go(func() error { return r.h.store.WatchNetwork(ctx, r.network.Name, r.rec.Kick) })
	eg.Go(func() error { return r.addrs.Run(ctx) })
	eg.Go(func() error { return r.reclaim.Run(ctx) })
	eg.Go(func() error { return r.mirror.Run(ctx) })
	eg.Go(func() error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(r.h.cfg.OrphanGrace):
		}
		if _, err := r.handler.ReleaseOrphans(ctx, r.before); err != nil {
			r.log.Warn("releasing addresses of vanished containers", "err", err)
		}
		return nil
	})
	return eg.Wait()
}

// Remove removes the deleted network from this host: the host veths of
// its containers, its devices and this host's record of its allocations.
// The containers keep their interfaces, cut off.
func (r *netRuntime) Remove(ctx context.Context) {
	list, err := r.alloc.List(ctx)
	if err != nil {
		r.log.Warn("listing the deleted network's containers", "err", err)
	}
	r.h.removeNetwork(ctx, r.network.Name, list, "the network was deleted with containers on it: they are cut off; remove them")
}

// Close releases the network's lock and metrics and stops the work its
// handler left running.
func (r *netRuntime) Close() {
	if r.stopBg != nil {
		r.stopBg()
	}
	if r.metrics != nil {
		r.metrics.Unregister()
	}
	if r.lock != nil {
		r.lock.Unlock()
	}
}

// importAllocations records in alloc, new to network, the host's
// allocations in etcd's copy: on the first start of a host that ran a
// release which kept no record of its own.
func importAllocations(ctx context.Context, alloc *local.Allocator, pool *etcd.Pool, network overlay.Network, log *slog.Logger) error {
	list, err := pool.List(ctx)
	if err != nil {
		return fmt.Errorf("import this host's allocations from etcd: %w", err)
	}
	if err := alloc.Import(ctx, list); err != nil {
		return err
	}
	if len(list) > 0 {
		log.Info("imported this host's allocations from etcd", "allocations", len(list))
	}
	return nil
}

// stats are the network's figures on this host, for its metrics; dp is
// its dataplane.
func (r *netRuntime) stats(dp *vxlan.Linux) metrics.NetworkStats {
	st := r.rec.Status()
	ps := r.addrs.Stats()
	ds := dp.Stats()
	list, _ := r.alloc.List(context.Background()) // a read of the local file
	s := metrics.NetworkStats{
		PeersProgrammed:    len(st.Config.Peers),
		Entries:            ds.Entries,
		Added:              ds.Added,
		Deleted:            ds.Deleted,
		Blocks:             len(r.addrs.Held()),
		MaxBlocks:          r.h.cfg.MaxBlocks,
		Addresses:          len(list),
		FreeAddresses:      r.addrs.Free(),
		StrandedAddresses:  len(r.alloc.Stranded()),
		BlockClaims:        ps.Claims,
		BlockClaimFailures: ps.ClaimFailures,
		BlockClaimWaits:    ps.WaitedClaims,
		BlockGiveBacks:     ps.GiveBacks,
		BlocksLost:         ps.Lost,
		ReclaimedBlocks:    r.reclaim.reclaimed.Load(),
		Passes:             st.Passes,
		PassFailures:       st.Failures,
		LastSuccess:        st.LastSuccess,
		LastPassTook:       st.Took,
		Disagreements:      len(st.Disagreements),
		DisagreeingMembers: st.DisagreeingMembers,
	}
	if ns := r.mirror.mirrored.Load(); ns != 0 {
		s.MirrorLastSuccess = time.Unix(0, ns)
	}
	return s
}

// timedFlush is a pool whose flushes are timed.
type timedFlush struct {
	attach.Pool
	observe func(time.Duration)
}

func (p timedFlush) Flush(ctx context.Context) error {
	start := time.Now()
	err := p.Pool.Flush(ctx)
	p.observe(time.Since(start))
	return err
}

// Inspect returns the network's status on this host, for overlayctl.
func (r *netRuntime) Inspect(ctx context.Context) ctlapi.NetworkStatus {
	st := r.rec.Status()
	out := ctlapi.NetworkStatus{
		Name: r.network.Name, VNI: r.network.VNI, CIDR: r.network.CIDR,
		Blocks: r.addrs.Held(), Free: r.addrs.Free(), PeersProgrammed: len(st.Config.Peers),
		Entries: r.dp.Stats().Entries, LastPass: st.LastPass, LastSuccess: st.LastSuccess, PassFailures: st.Failures,
	}
	if list, err := r.alloc.List(ctx); err == nil {
		out.Addresses = len(list)
	}
	if hs, err := r.handler.Status(ctx); err != nil {
		out.Reason = err.Error()
	} else {
		out.Ready, out.Degraded, out.Reason = hs.Ready, hs.Degraded, hs.Reason
	}
	return out
}

// Doctor checks the network on this host: its kernel state against what
// etcd says now, the reconcile loop's last pass, gossip's disagreements
// with etcd, and addresses stranded in blocks lost.
func (r *netRuntime) Doctor(ctx context.Context) []ctlapi.Finding {
	name := r.network.Name
	var out []ctlapi.Finding
	var disagree []overlay.Disagreement
	desired := func(ctx context.Context) (overlay.DataplaneConfig, error) {
		owners, err := r.pool.Owners(ctx)
		if err != nil {
			return overlay.DataplaneConfig{}, err
		}
		hosts, err := r.h.dir.Hosts(ctx)
		if err != nil {
			return overlay.DataplaneConfig{}, err
		}
		var cfg overlay.DataplaneConfig
		cfg, disagree = overlay.Desired(r.network, r.local, owners, hosts, r.h.gossip.Members())
		return cfg, nil
	}
	settle := func(ctx context.Context) {
		// Two passes: the one in progress may have read etcd before
		// the first check did; the next starts after it.
		ctx, cancel := context.WithTimeout(ctx, settleTimeout)
		defer cancel()
		n := r.rec.Status().Passes
		for want := n + 1; want <= n+2; want++ {
			r.rec.Kick()
			for r.rec.Status().Passes < want && ctx.Err() == nil {
				select {
				case <-ctx.Done():
				case <-time.After(20 * time.Millisecond):
				}
			}
		}
	}
	diffs, err := persisting(ctx, desired, r.dp.Check, settle)
	st := r.rec.Status()
	if err != nil {
		out = append(out, ctlapi.Finding{Severity: ctlapi.Warning, Network: name, Check: "dataplane", Problem: "could not compare the kernel with etcd: " + err.Error(), Fix: "run the doctor again once etcd answers"})
	}
	for _, d := range diffs {
		out = append(out, differenceFinding(name, d, st.LastErr))
	}
	if st.LastErr != nil {
		out = append(out, ctlapi.Finding{Severity: ctlapi.Error, Network: name, Check: "reconcile", Problem: "the reconcile loop's last pass failed: " + st.LastErr.Error(),
			Fix: "the loop retries on every pass; the error says which entry or which read failed (overlay_reconcile_failures_total counts them)"})
	}
	for _, d := range disagree {
		out = append(out, ctlapi.Finding{Severity: ctlapi.Warning, Network: name, Check: "gossip", Problem: fmt.Sprintf("host %s: %s", d.Host, d),
			Fix: "the dataplane follows etcd and ignores gossip's value; a host that kept its ID but changed its address or MAC re-registers when its overlayd restarts, and a duplicate host ID (a cloned machine) needs a new identity file"})
	}
	if stranded := r.alloc.Stranded(); len(stranded) > 0 {
		var ids []string
		for _, al := range stranded {
			ids = append(ids, fmt.Sprintf("%s (%s)", al.Key, al.Addr.Addr()))
		}
		out = append(out, ctlapi.Finding{Severity: ctlapi.Error, Network: name, Check: "addresses",
			Problem: fmt.Sprintf("%d containers hold addresses of blocks reclaimed while this host was away: %s", len(stranded), strings.Join(ids, ", ")),
			Fix:     "recreate these containers: another host may hand out their addresses (docs/ipam.md)"})
	}
	return out
}

// Release releases a leaked address of the network (attach.Network.Release).
func (r *netRuntime) Release(ctx context.Context, a netip.Addr, force bool) (ctlapi.ReleaseResponse, error) {
	key, deleted, err := r.handler.Release(ctx, a, force)
	return ctlapi.ReleaseResponse{Key: key, VethDeleted: deleted}, err
}

// MeshTargets returns the peers the health mesh probes on the network:
// every peer the dataplane was last programmed with, at the gateway of
// its first block, which only the VXLAN path reaches.
func (r *netRuntime) MeshTargets() []mesh.Target {
	cfg := r.rec.Status().Config
	out := make([]mesh.Target, 0, len(cfg.Peers))
	for _, p := range cfg.Peers {
		if len(p.Blocks) > 0 {
			out = append(out, mesh.Target{Network: r.network.Name, Peer: p.Host, Addr: overlay.Gateway(p.Blocks[0]), MTU: cfg.MTU})
		}
	}
	return out
}
