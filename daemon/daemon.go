package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/overlaynet/overlay/cnirpc/rpcserver"
	"github.com/overlaynet/overlay/gossip"
	"github.com/overlaynet/overlay/internal/backoff"
	"github.com/overlaynet/overlay/ipam"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/etcd/embedded"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/metrics"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/hostlink"
	"github.com/overlaynet/overlay/overlay/vxlan"
)

// AllocationsFile is the file in the data directory that holds the host's
// address allocations.
const AllocationsFile = "allocations.db"

// joinTimeout bounds one round of gossip joins.
const joinTimeout = 10 * time.Second

// ipForwardPath is the sysctl that lets the host route between the bridge
// and the VXLAN device.
const ipForwardPath = "/proc/sys/net/ipv4/ip_forward"

// Run runs overlayd until ctx is done. It returns an error when it cannot
// start (bad configuration, a socket or port it cannot open, etcd
// unreachable, a network that differs from etcd's) or when a component
// fails. Everything that can fail on this host alone is checked, and
// every listener opened, before anything changes in etcd or the kernel,
// so that a start that fails changes nothing. On return the dataplane is
// left in place, so that restarting overlayd does not cut established
// flows.
func Run(ctx context.Context, cfg Config) error {
	start := time.Now()
	cfg = cfg.withDefaults()
	log := cfg.Logger
	if err := cfg.Network.Validate(); err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	var keys [][]byte
	if cfg.GossipKeyFile != "" {
		var err error
		if keys, err = gossip.LoadKeys(cfg.GossipKeyFile); err != nil {
			return fmt.Errorf("--gossip-key-file: %w", err)
		}
	}
	// A cluster's etcd is dialled while this host's own checks run: a
	// connection changes nothing, and a new host reaches its first block
	// (the moment the others route it) sooner. The embedded etcd starts
	// after the checks, as it writes its data directory.
	var early chan etcdConnection
	taken := false
	if len(cfg.Etcd.Endpoints) > 0 {
		dctx, cancelDial := context.WithCancel(ctx)
		early = make(chan etcdConnection, 1)
		go func() { early <- connectEtcd(dctx, cfg) }()
		defer func() {
			// The client outlives dctx: etcd.Connect detaches it.
			cancelDial()
			if !taken { // a check failed first
				if c := <-early; c.err == nil {
					c.close()
				}
			}
		}()
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	host, err := LoadIdentity(cfg.DataDir)
	if err != nil {
		return err
	}
	mac := VTEPMAC(host)
	log = log.With("host", host)
	// The allocation file first: its lock keeps a second overlayd on this
	// data directory from touching etcd or the kernel; the namespace's
	// lock keeps one with another data directory off this network's
	// devices.
	allocs, err := local.Open(filepath.Join(cfg.DataDir, AllocationsFile), host)
	if err != nil {
		return err
	}
	defer allocs.Close()
	lock, err := lockNetwork(cfg.Network.Name)
	if err != nil {
		return err
	}
	defer lock.Unlock()
	// The host's record of the network, read whole now: a corrupt record
	// fails the start before anything changes. It allocates from the
	// pool's blocks once the pool exists (usable).
	var usable func() []netip.Prefix
	alloc, freshAlloc, err := allocs.Allocator(cfg.Network, host, func() []netip.Prefix { return usable() })
	if err != nil {
		return err
	}

	h, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	ul, err := vxlan.DetectUnderlay(h, cfg.UnderlayAddr)
	if err != nil {
		return err
	}

	// Every listener before a change: a socket path or a port that cannot
	// be used fails the start here.
	l, err := rpcserver.Listen(cfg.Socket)
	if err != nil {
		return fmt.Errorf("CNI socket (--socket): %w", err)
	}
	defer os.Remove(cfg.Socket)
	cniLog := log.With("component", "cni")
	m := metrics.New()
	// Every request is counted, those a starting overlayd answers too.
	var cniHandler switchHandler
	cniHandler.Set(rpcserver.NewHandler(starting{network: cfg.Network.Name, links: hostlink.New(h)}, cniLog))
	srv := rpcserver.NewServer(rpcserver.Observed(&cniHandler, m.ObserveCNI), rpcserver.DefaultServerConfig(), cniLog)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	defer srv.Close()

	var metricsListener net.Listener
	if cfg.MetricsAddr != "" {
		if metricsListener, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			return fmt.Errorf("metrics listener (--metrics-addr): %w", err)
		}
		defer metricsListener.Close()
	}

	// Gossip starts before the reconciler exists (the reconciler reads
	// its members); its callbacks find the reconciler here once it does.
	var recPtr atomic.Pointer[overlay.Reconciler]
	gcfg := gossip.DefaultConfig()
	gcfg.Host = host
	gcfg.Underlay = ul.Addr
	gcfg.VTEPMAC = mac
	gcfg.BindAddr = ul.Addr
	gcfg.BindPort = cfg.GossipPort
	gcfg.Keys = keys
	gcfg.Logger = log.With("component", "gossip")
	gcfg.OnChange = func() {
		if r := recPtr.Load(); r != nil {
			r.Kick()
		}
	}
	g, err := gossip.New(gcfg)
	if err != nil {
		return fmt.Errorf("gossip (--gossip-port %d): %w", cfg.GossipPort, err)
	}
	defer g.Shutdown()
	if !g.Encrypted() {
		log.Warn("gossip is not encrypted: set --gossip-key-file so that hosts without the key cannot join")
	}

	var conn etcdConnection
	if early != nil {
		conn, taken = <-early, true
	} else {
		conn = connectEtcd(ctx, cfg)
	}
	if conn.err != nil {
		return conn.err
	}
	defer conn.close()
	cli, emb := conn.cli, conn.emb
	store := etcd.NewStore(cli, cfg.EtcdPrefix)
	network, err := store.EnsureNetwork(ctx, cfg.Network)
	if err != nil {
		return err
	}

	// From here on, etcd and the kernel change.
	if err := os.WriteFile(ipForwardPath, []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	// The host record before the block: a peer that sees the block (its
	// watch) finds the record that says where to send its traffic. The
	// liveness key before the blocks too: from then on no host reclaims
	// this host's blocks, and a note that it was gone is cleared. Both are
	// written at once, and the blocks read beside them: a new host is
	// programmed on the others as soon as its block exists, so every
	// round trip before it counts.
	gossipAddr := netip.AddrPortFrom(ul.Addr, uint16(g.LocalAddr().Port())).String()
	live := store.Liveness(host, 0, log.With("component", "liveness"))
	pool := store.Pool(network, host)
	var lease clientv3.LeaseID
	var first errgroup.Group
	if freshAlloc {
		// A record new to this network: the host may have run a release
		// that kept none, and etcd's copy is what there is.
		first.Go(func() error { return importAllocations(ctx, alloc, pool, network, log) })
	}
	first.Go(func() error {
		return store.RegisterHost(ctx, etcd.HostRecord{Host: host, Underlay: ul.Addr, VTEPMAC: mac.String(), Gossip: gossipAddr, Updated: time.Now().UTC()})
	})
	first.Go(func() (err error) {
		lease, err = live.Create(ctx)
		return err
	})
	// The blocks this host holds, read beside them. A reclaim may commit
	// between that read and the liveness key; none can after it, so the
	// blocks read are checked once the key exists (a new host has none).
	var blocks []netip.Prefix
	first.Go(func() (err error) {
		blocks, err = pool.Load(ctx)
		return err
	})
	if err := first.Wait(); err != nil {
		return err
	}
	if len(blocks) > 0 {
		if _, err := pool.Verify(ctx); err != nil && !errors.Is(err, etcd.ErrBlockLost) {
			return err
		}
		// A block lost here leaves its containers stranded: reported
		// below.
	}
	addrs, err := ipam.New(ipam.Config{
		Network: network, Host: host, MaxBlocks: cfg.MaxBlocks, IdleBlock: cfg.IdleBlock,
		VerifyInterval: cfg.VerifyInterval, Log: log.With("component", "ipam"),
	}, pool, func(held func() []netip.Prefix) (ipam.Book, error) {
		usable = held
		return alloc, nil
	})
	if err != nil {
		return err
	}
	// Containers whose block was reclaimed while this host was away
	// keep addresses another host may hand out: say so before anything
	// else.
	addrs.ReportStranded(nil)
	if err := addrs.Ensure(ctx); err != nil {
		return err
	}
	log.Info("holding blocks", "network", network.Name, "blocks", pool.Held(), "loaded", len(blocks))
	d := &daemon{cfg: cfg, log: log, host: host, store: store, pool: pool, addrs: addrs, alloc: alloc, live: live, gossip: g, network: network, metrics: m}

	// The first pass needs no gossip: peers are programmed from their
	// host records, so a restarted overlayd keeps every host that owns
	// blocks, and a registered host that is gone does not hold up the
	// start. Joining is the background loop's work.
	local := overlay.Local{Host: host, Underlay: ul.Addr, UnderlayLink: ul.Link, MTU: ul.MTU - vxlan.Overhead, VTEPMAC: mac, BridgeMAC: BridgeMAC(host, network.Name)}
	dp := vxlan.New(h, log.With("component", "dataplane"))
	rec := overlay.NewReconciler(network, local, pool, &hostDirectory{store: store, log: log.With("component", "reconcile")}, g, dp, cfg.ResyncInterval, log.With("component", "reconcile"))
	d.rec = rec
	recPtr.Store(rec)
	if err := rec.Pass(ctx); err != nil {
		// Not fatal: one failing entry must not crash-loop overlayd. The
		// loop retries; STATUS says "not ready" until a pass succeeds.
		log.Error("programming the dataplane failed; retrying", "err", err)
	}
	d.registerMetrics()

	handler := NewCNIHandler(ctx, network, local.MTU, addrs, rec.Status, func() int { return g.Stats().Members }, hostlink.New(h), cniLog)
	before, err := handler.Allocations(ctx)
	if err != nil {
		log.Warn("reading this host's allocations; addresses of vanished containers stay allocated until GC", "err", err)
	}
	if stale := handler.StaleMTU(before); len(stale) > 0 {
		var ids []string
		for k, mtu := range stale {
			ids = append(ids, fmt.Sprintf("%s (%d)", k, mtu))
		}
		slices.Sort(ids)
		log.Warn("containers created before the MTU changed keep their old MTU, and CHECK fails for them: recreate them",
			"network", network.Name, "mtu", local.MTU, "containers", ids)
	}
	cniHandler.Set(rpcserver.NewHandler(handler, cniLog))
	log.Info("ready", "network", network.Name, "underlay", ul.Addr, "vtep-mac", mac.String(), "mtu", local.MTU,
		"socket", cfg.Socket, "gossip", gossipAddr, "encrypted", g.Encrypted(), "startup", time.Since(start).Round(time.Millisecond))

	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error { return rec.Run(ctx) })
	eg.Go(func() error { return g.Run(ctx) })
	eg.Go(func() error { return store.WatchNetwork(ctx, network.Name, rec.Kick) })
	eg.Go(func() error { return addrs.Run(ctx) })
	eg.Go(func() error { return live.Run(ctx, lease) })
	eg.Go(func() error { return d.reclaimLoop(ctx) })
	eg.Go(func() error { return d.mirror(ctx) })
	eg.Go(func() error {
		d.rejoin(ctx)
		return every(ctx, cfg.RejoinInterval, d.rejoin)
	})
	if cfg.ReloadKeys != nil {
		eg.Go(func() error { return d.reloadKeys(ctx, cfg.ReloadKeys) })
	}
	eg.Go(func() error {
		select {
		case err := <-serveErr:
			if err != nil && !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("serve CNI socket: %w", err)
			}
			return nil
		case <-ctx.Done():
		}
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	if metricsListener != nil {
		eg.Go(func() error { return m.Serve(ctx, metricsListener) })
	}
	eg.Go(func() error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(cfg.OrphanGrace):
		}
		if _, err := handler.ReleaseOrphans(ctx, before); err != nil {
			log.Warn("releasing addresses of vanished containers", "err", err)
		}
		return nil
	})
	if emb != nil {
		eg.Go(func() error {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case err := <-emb.Err():
				return fmt.Errorf("embedded etcd failed: %w", err)
			}
		})
	}
	err = eg.Wait()
	log.Info("stopped; the dataplane stays in place", "err", err)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// etcdConnection is a client of the configured etcd, with the embedded
// server it talks to when no endpoints are configured, or the error that
// kept it from being made: one value, so that a channel can carry it.
type etcdConnection struct {
	cli *clientv3.Client
	emb *embedded.Server // nil with --etcd-endpoints
	err error
}

// close closes the client, then the embedded server.
func (c etcdConnection) close() {
	c.cli.Close()
	if c.emb != nil {
		c.emb.Close()
	}
}

// connectEtcd returns a client of the configured etcd, starting an
// embedded one when no endpoints are configured.
func connectEtcd(ctx context.Context, cfg Config) etcdConnection {
	ecfg := cfg.Etcd
	var c etcdConnection
	if len(ecfg.Endpoints) == 0 {
		c.emb, c.err = embedded.Start(ctx, embedded.Config{
			Dir: cfg.DataDir, ClientURL: cfg.EmbeddedClientURL, PeerURL: cfg.EmbeddedPeerURL, Logger: cfg.Logger,
		})
		if c.err != nil {
			return c
		}
		ecfg.Endpoints = []string{c.emb.ClientURL}
	}
	if c.cli, c.err = etcd.Connect(ctx, ecfg); c.err != nil && c.emb != nil {
		c.emb.Close()
	}
	return c
}

// daemon is the running state shared by the loops and the CNI handler.
type daemon struct {
	cfg     Config
	log     *slog.Logger
	host    overlay.HostID
	store   *etcd.Store
	pool    *etcd.Pool
	addrs   *ipam.Pool
	alloc   *local.Allocator
	live    *etcd.Liveness
	gossip  *gossip.Gossip
	network overlay.Network
	rec     *overlay.Reconciler
	metrics *metrics.Metrics
	// reclaimed counts the blocks of gone hosts this host freed.
	reclaimed atomic.Uint64
	// mirrored is when the mirror last copied the allocations to etcd
	// (Unix nanoseconds), 0 before the first copy.
	mirrored atomic.Int64
}

// every calls fn every interval until ctx is done, and returns ctx's
// error.
func every(ctx context.Context, interval time.Duration, fn func(context.Context)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			fn(ctx)
		}
	}
}

// reclaimInterval returns how often the host looks for blocks of gone
// hosts to free: every verify interval, or four times a reclaim period
// shorter than that, but at most once a second.
func (d *daemon) reclaimInterval() time.Duration {
	return max(time.Second, min(d.cfg.VerifyInterval, d.cfg.ReclaimAfter/4))
}

// reclaimLoop frees the blocks of hosts whose liveness key has been gone
// for the reclaim period, until ctx is done. Every host runs it; the
// transactions are fenced, so two hosts freeing the same block, or an
// owner coming back meanwhile, is safe. The waits are jittered so that
// hosts do not look in lockstep.
func (d *daemon) reclaimLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff.Jitter(d.reclaimInterval(), 0.5, rand.Float64())):
		}
		rctx, cancel := context.WithTimeout(ctx, storeTimeout)
		freed, err := d.store.Reclaim(rctx, d.network, d.host, d.cfg.ReclaimAfter, time.Now())
		cancel()
		if err != nil && ctx.Err() == nil {
			d.log.Warn("looking for blocks of gone hosts failed; will retry", "err", err)
		}
		byOwner := make(map[overlay.HostID][]netip.Prefix)
		since := make(map[overlay.HostID]time.Time)
		for _, r := range freed {
			byOwner[r.Owner] = append(byOwner[r.Owner], r.Block)
			since[r.Owner] = r.GoneSince
		}
		for owner, blocks := range byOwner {
			d.log.Warn("freed the blocks of a host whose liveness key is gone for longer than the reclaim period",
				"network", d.network.Name, "owner", owner, "blocks", blocks, "gone-since", since[owner].Format(time.RFC3339), "reclaim-after", d.cfg.ReclaimAfter)
		}
		if len(freed) > 0 {
			d.reclaimed.Add(uint64(len(freed)))
			d.rec.Kick()
		}
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
		log.Info("imported this host's allocations from etcd", "network", network.Name, "allocations", len(list))
	}
	return nil
}

// mirrorDelay is how long the mirror lets changes gather before it copies
// them. A failed copy is tried again mirrorRetry later at most, spread down
// to half of it (mirrorRetryJitter) so that hosts failed by the same etcd
// outage do not retry in lockstep.
const (
	mirrorDelay       = 100 * time.Millisecond
	mirrorRetry       = time.Second
	mirrorRetryJitter = 0.5
)

// mirror copies the host's allocations to etcd, until ctx is done: at
// once, mirrorDelay after a change (so that a burst of ADDs and DELs
// costs one etcd transaction, not one each, and etcd's disk writes stay
// out of the way of the ADDs'), every resync interval, and within a second
// after a failed copy (etcd down).
func (d *daemon) mirror(ctx context.Context) error {
	tick := time.NewTicker(d.cfg.ResyncInterval)
	defer tick.Stop()
	pass := time.NewTimer(0)
	defer pass.Stop()
	scheduled := true
	var failingSince time.Time
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-d.alloc.Changed():
			if !scheduled {
				pass.Reset(mirrorDelay)
				scheduled = true
			}
			continue
		case <-tick.C:
		case <-pass.C:
			scheduled = false
		}
		mctx, cancel := context.WithTimeout(ctx, storeTimeout)
		list, err := d.alloc.List(mctx)
		var n int
		if err == nil {
			n, err = d.pool.Mirror(mctx, list)
		}
		cancel()
		if err == nil {
			d.mirrored.Store(time.Now().UnixNano())
		}
		switch {
		case err != nil && ctx.Err() == nil:
			d.metrics.MirrorFailures.Inc()
			if failingSince.IsZero() {
				failingSince = time.Now()
				d.log.Warn("copying allocations to etcd failed; retrying within a second (allocation goes on from this host's own record)", "err", err)
			}
			pass.Reset(backoff.Jitter(mirrorRetry, mirrorRetryJitter, rand.Float64()))
			scheduled = true
		case err == nil && !failingSince.IsZero():
			d.log.Info("allocations copied to etcd again", "after", time.Since(failingSince).Round(time.Second), "changed", n)
			failingSince = time.Time{}
		case err == nil && n > 0:
			d.log.Debug("allocations copied to etcd", "changed", n)
		}
	}
}

// rejoin joins the hosts registered in etcd that gossip does not know: run
// periodically, it heals partitions and hosts that started at the same
// moment and found nobody.
func (d *daemon) rejoin(ctx context.Context) { d.join(ctx, d.hosts(ctx)) }

// hosts returns the host records in etcd; on a failure, what it could
// read (maybe nothing), after a warning.
func (d *daemon) hosts(ctx context.Context) []etcd.HostRecord {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	hosts, err := d.store.Hosts(ctx)
	if err != nil {
		d.log.Warn("listing host records", "err", err)
	}
	return hosts
}

// join joins over gossip the hosts that gossip does not know yet.
func (d *daemon) join(ctx context.Context, hosts []etcd.HostRecord) {
	known := make(map[overlay.HostID]bool)
	for _, m := range d.gossip.Members() {
		known[m.Host] = true
	}
	var addrs []string
	for _, h := range hosts {
		if h.Host != d.host && !known[h.Host] && h.Gossip != "" {
			addrs = append(addrs, h.Gossip)
		}
	}
	if len(addrs) == 0 {
		return
	}
	jctx, cancel := context.WithTimeout(ctx, joinTimeout)
	defer cancel()
	n, err := d.gossip.Join(jctx, addrs)
	if err != nil && n == 0 {
		d.log.Warn("no registered host answered gossip; will retry", "hosts", len(addrs), "err", err)
		return
	}
	d.log.Info("joined gossip", "contacted", n, "of", len(addrs))
}

// registerMetrics exports the reconcile and gossip state.
func (d *daemon) registerMetrics() {
	lbl := prometheus.Labels{"network": d.network.Name}
	m := d.metrics
	m.GaugeFunc("dataplane", "peers", "Other hosts programmed in the dataplane.", lbl, func() float64 {
		return float64(len(d.rec.Status().Config.Peers))
	})
	m.GaugeFunc("ipam", "blocks", "Blocks this host allocates from.", lbl, func() float64 {
		return float64(len(d.addrs.Held()))
	})
	m.GaugeFunc("ipam", "addresses", "Addresses allocated to containers on this host.", lbl, func() float64 {
		list, _ := d.alloc.List(context.Background())
		return float64(len(list))
	})
	m.GaugeFunc("ipam", "free_addresses", "Free addresses in the blocks this host holds.", lbl, func() float64 {
		return float64(d.addrs.Free())
	})
	m.GaugeFunc("ipam", "max_blocks", "The cap on the blocks this host may hold (--max-blocks).", lbl, func() float64 {
		return float64(d.cfg.MaxBlocks)
	})
	m.GaugeFunc("ipam", "stranded_addresses", "Addresses containers on this host hold in blocks it lost (reclaimed or removed while it was away): recreate those containers.", lbl, func() float64 {
		return float64(len(d.alloc.Stranded()))
	})
	m.CounterFunc("ipam", "block_claims_total", "Blocks this host claimed.", lbl, func() float64 {
		return float64(d.addrs.Stats().Claims)
	})
	m.CounterFunc("ipam", "block_claim_failures_total", "Block claims that failed for another reason than a full network (etcd unreachable).", lbl, func() float64 {
		return float64(d.addrs.Stats().ClaimFailures)
	})
	m.CounterFunc("ipam", "block_claim_waits_total", "ADDs that found every held block full and waited for a claim.", lbl, func() float64 {
		return float64(d.addrs.Stats().WaitedClaims)
	})
	m.CounterFunc("ipam", "block_give_backs_total", "Empty blocks this host gave back.", lbl, func() float64 {
		return float64(d.addrs.Stats().GiveBacks)
	})
	m.CounterFunc("ipam", "blocks_lost_total", "Blocks this host found taken by another host or removed in etcd.", lbl, func() float64 {
		return float64(d.addrs.Stats().Lost)
	})
	m.CounterFunc("ipam", "reclaimed_blocks_total", "Blocks of gone hosts (liveness key gone for the reclaim period) this host freed.", lbl, func() float64 {
		return float64(d.reclaimed.Load())
	})
	m.CounterFunc("ipam", "liveness_lost_total", "Times this host's liveness key was lost (its lease expired, as in a quorum loss longer than its TTL) and created again.", nil, func() float64 {
		return float64(d.live.Lost())
	})
	m.GaugeFunc("ipam", "liveness", "1 while this host's liveness key exists in etcd, as far as it knows; 0 while it is being created again.", nil, func() float64 {
		if d.live.Alive() {
			return 1
		}
		return 0
	})
	m.GaugeFunc("ipam", "mirror_last_success_timestamp_seconds", "When this host's allocations were last copied to etcd, in Unix seconds; 0 before the first copy.", nil, func() float64 {
		return float64(d.mirrored.Load()) / 1e9
	})
	m.CounterFunc("reconcile", "passes_total", "Reconcile passes, failed ones included.", lbl, func() float64 {
		return float64(d.rec.Status().Passes)
	})
	m.CounterFunc("reconcile", "failures_total", "Reconcile passes that failed.", lbl, func() float64 {
		return float64(d.rec.Status().Failures)
	})
	m.GaugeFunc("gossip", "disagreements", "Fields of live members' gossip metadata that differ from etcd in the last pass (ignored).", lbl, func() float64 {
		return float64(len(d.rec.Status().Disagreements))
	})
	m.CounterFunc("gossip", "disagreeing_members_total", "Times a live member's gossip metadata came to differ from etcd (each logged once at WARN).", lbl, func() float64 {
		return float64(d.rec.Status().DisagreeingMembers)
	})
	m.GaugeFunc("gossip", "members", "Other live hosts with valid metadata.", nil, func() float64 {
		return float64(d.gossip.Stats().Members)
	})
	m.CounterFunc("gossip", "rejected_metadata_total", "Gossip metadata rejected as malformed.", nil, func() float64 {
		return float64(d.gossip.Stats().RejectedMetas)
	})
}
