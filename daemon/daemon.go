package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
	"github.com/overlaynet/overlay/cnm"
	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/gossip"
	"github.com/overlaynet/overlay/internal/version"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/etcd/embedded"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/metrics"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/firewall"
	"github.com/overlaynet/overlay/overlay/hostlink"
	"github.com/overlaynet/overlay/overlay/mesh"
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
// so that a start that fails changes nothing. Then it serves every
// network in etcd, starting and removing networks as they are created
// and deleted. On return the dataplane is left in place, so that
// restarting overlayd does not cut established flows.
//
// Under systemd (Type=notify) it reports its start in STATUS lines, sends
// READY=1 once it serves ADD and STOPPING=1 when it stops, and, with
// WatchdogSec, pings the watchdog while every network's reconcile loop
// ends passes (stallAfter).
func Run(ctx context.Context, cfg Config) error {
	start := time.Now()
	cfg = cfg.withDefaults()
	log := cfg.Logger
	sd := newNotifier(log)
	sd.status("checking the configuration and this host")
	m := metrics.New(version.Read())
	// The etcd client's requests are counted and timed from the first.
	cfg.Etcd.DialOptions = append(cfg.Etcd.DialOptions, m.EtcdClientOptions()...)
	wdInterval, err := watchdogInterval()
	if err != nil {
		return err
	}
	if cfg.Network.Name != "" {
		if err := cfg.Network.Validate(); err != nil {
			return fmt.Errorf("configuration: %w", err)
		}
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
	id, err := LoadIdentity(cfg.DataDir)
	if err != nil {
		return err
	}
	mac := VTEPMAC(id)
	log = log.With("host", id)
	// The allocation file first: its lock keeps a second overlayd on this
	// data directory from touching etcd or the kernel.
	allocs, err := local.Open(filepath.Join(cfg.DataDir, AllocationsFile), id)
	if err != nil {
		return err
	}
	defer allocs.Close()

	nl, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer nl.Close()
	// The dataplanes list FDB and neighbour entries through a socket of
	// their own, on which the kernel filters them by device. A kernel
	// without strict checking (before 4.20) sends them all: slower, the
	// same result.
	nlNeigh, err := vxlan.OpenNeighSocket(netns.None())
	if err != nil {
		log.Warn("listing FDB and neighbour entries the slow way: every container's are read on every pass", "err", err)
	} else {
		defer nlNeigh.Close()
	}
	ul, err := vxlan.DetectUnderlay(nl, cfg.UnderlayAddr)
	if err != nil {
		return err
	}
	links := hostlink.New(nl)
	fw, err := firewall.New()
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
	// Every request is counted, those a starting overlayd answers too.
	svc := attach.NewService(links)
	// overlayctl's requests share the socket, below /v1/host/; they are
	// not CNI requests, and are not counted as such. They are answered
	// once the host runtime exists.
	var ctl atomic.Pointer[http.Handler]
	mux := http.NewServeMux()
	mux.Handle("/", rpcserver.Observed(rpcserver.NewHandler(cniHandler{svc}, cniLog), func(o rpcserver.Outcome) {
		m.ObserveCNI(o.Op, o.Result, o.Answer, o.Confirmation)
	}))
	mux.Handle("/v1/host/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := ctl.Load()
		if c == nil {
			writeControl(w, http.StatusServiceUnavailable, ctlapi.ErrorBody{Error: "overlayd is starting; try again in a moment"})
			return
		}
		(*c).ServeHTTP(w, r)
	}))
	srv := rpcserver.NewServer(mux, rpcserver.DefaultServerConfig(), cniLog)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	defer srv.Close()

	// Docker's plugin socket, answering from the first moment: dockerd
	// waits 15 s for a plugin whose socket is missing.
	var dockerHandler atomic.Pointer[http.Handler]
	var dockerSrv *rpcserver.Server
	dockerServeErr := make(chan error, 1)
	if cfg.DockerSocket != "" {
		dl, err := rpcserver.Listen(cfg.DockerSocket)
		if err != nil {
			return fmt.Errorf("docker plugin socket (--docker-plugin-socket): %w", err)
		}
		defer os.Remove(cfg.DockerSocket)
		dockerLog := log.With("component", "docker")
		starting := cnm.NewHandler(startingDocker{}, dockerLog)
		dockerSrv = rpcserver.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if h := dockerHandler.Load(); h != nil {
				(*h).ServeHTTP(w, r)
				return
			}
			starting.ServeHTTP(w, r)
		}), rpcserver.DefaultServerConfig(), dockerLog)
		go func() { dockerServeErr <- dockerSrv.Serve(dl) }()
		defer dockerSrv.Close()
	}

	var metricsListener net.Listener
	if cfg.MetricsAddr != "" {
		if metricsListener, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			return fmt.Errorf("metrics listener (--metrics-addr): %w", err)
		}
		defer metricsListener.Close()
	}

	// Gossip starts before the networks exist (their reconcilers read its
	// members); its callbacks find them here once they do.
	var setPtr atomic.Pointer[networkSet]
	gcfg := gossip.DefaultConfig()
	gcfg.Host = id
	gcfg.Underlay = ul.Addr
	gcfg.VTEPMAC = mac
	gcfg.BindAddr = ul.Addr
	gcfg.BindPort = cfg.GossipPort
	gcfg.Keys = keys
	gcfg.Logger = log.With("component", "gossip")
	gcfg.OnChange = func() {
		if s := setPtr.Load(); s != nil {
			s.KickAll()
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

	sd.status("connecting to etcd")
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
	emb := conn.emb
	store := etcd.NewStore(conn.cli, cfg.EtcdPrefix)
	if cfg.Network.Name != "" {
		// The flags' network: made sure of before anything else changes,
		// so that one that differs from etcd's fails the start.
		if _, err := store.EnsureNetwork(ctx, cfg.Network); err != nil {
			return err
		}
	}
	// From here on, etcd and the kernel change.
	sd.status("registering this host and starting its networks")
	if err := os.WriteFile(ipForwardPath, []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	// The host record before the blocks: a peer that sees a block (its
	// watch) finds the record that says where to send its traffic. The
	// liveness key before the blocks too: from then on no host reclaims
	// this host's blocks, and a note that it was gone is cleared. Both are
	// written at once, and the list of networks read beside them.
	gossipAddr := netip.AddrPortFrom(ul.Addr, uint16(g.LocalAddr().Port())).String()
	live := store.Liveness(id, 0, log.With("component", "liveness"))
	var lease clientv3.LeaseID
	var defs []overlay.Network
	var first errgroup.Group
	first.Go(func() error {
		lctx, cancel := context.WithTimeout(ctx, listTimeout)
		defer cancel()
		var err error
		if defs, err = store.Networks(lctx); err != nil && defs == nil {
			return fmt.Errorf("list the networks in etcd: %w", err)
		} else if err != nil {
			log.Warn("leaving out network definitions that cannot be decoded", "err", err)
		}
		return nil
	})
	first.Go(func() error {
		return store.RegisterHost(ctx, etcd.HostRecord{Host: id, Underlay: ul.Addr, VTEPMAC: mac.String(), Gossip: gossipAddr, Updated: time.Now().UTC()})
	})
	first.Go(func() (err error) {
		lease, err = live.Create(ctx)
		return err
	})
	if err := first.Wait(); err != nil {
		return err
	}
	h := &host{cfg: cfg, log: log, id: id, started: start, embedded: emb != nil, gossipAddr: gossipAddr,
		mac: mac, ul: ul, store: store, allocs: allocs, gossip: g, live: live,
		metrics: m, links: links, svc: svc, dp: vxlan.New(nl, nlNeigh, log.With("component", "dataplane")), nl: nl, nlNeigh: nlNeigh, fw: fw,
		dir: newHostDirectory(store, log.With("component", "reconcile"))}
	set := newNetworkSet(store.Networks, h.startNetwork, h.converge, networkResync, networkRetry, log)
	setPtr.Store(set)
	set.Start(ctx, defs)
	svc.Serve(set, func(ctx context.Context, name string) (bool, error) {
		_, err := store.Network(ctx, name)
		if errors.Is(err, overlay.ErrNotFound) {
			return false, nil
		}
		return err == nil, err
	})
	if !cfg.NoMesh {
		if pinger, err := mesh.ListenICMP(); err != nil {
			log.Warn("the health mesh is off: overlayd cannot probe its peers across the overlay (it needs CAP_NET_RAW; --no-health-mesh silences this)", "err", err)
		} else {
			defer pinger.Close()
			h.mesh = mesh.New(mesh.Config{Interval: cfg.MeshInterval, Rate: cfg.MeshRate, Log: log.With("component", "mesh")}, func() []mesh.Target {
				// Peers gossip saw fail or leave are not probed: a host
				// that is down would be a red pair on every other host,
				// which OverlaydDown and the doctor already say better.
				var all []mesh.Target
				for _, n := range set.Started() {
					for _, tg := range n.MeshTargets() {
						if g.State(tg.Peer) != gossip.Departed {
							all = append(all, tg)
						}
					}
				}
				return all
			}, pinger)
		}
	}
	h.registerMetrics()
	ctlHandler := controlHandler(control{h: h, set: set}, log.With("component", "control"))
	ctl.Store(&ctlHandler)
	dockerLog := log.With("component", "docker")
	docker := &dockerBackend{host: id, store: store, svc: svc, links: netlinkDockerLinks{links}, routes: hostRoutes(nl),
		log: dockerLog, nets: make(map[string]string)}
	if dockerSrv != nil {
		dh := cnm.NewHandler(docker, dockerLog)
		dockerHandler.Store(&dh)
	}
	log.Info("ready", "networks", set.Names(), "underlay", ul.Addr, "vtep-mac", mac.String(), "underlay-mtu", ul.MTU,
		"socket", cfg.Socket, "gossip", gossipAddr, "encrypted", g.Encrypted(), "startup", time.Since(start).Round(time.Millisecond))

	sd.ready(fmt.Sprintf("ready: %d networks, underlay %s", len(set.Names()), ul.Addr))

	eg, ctx := errgroup.WithContext(ctx)
	eg.Go(func() error {
		<-ctx.Done()
		sd.stopping()
		return nil
	})
	if wdInterval > 0 {
		stall := stallAfter(cfg.ResyncInterval)
		if 2*wdInterval <= stall {
			log.Warn("WatchdogSec is not above the time after which a reconcile loop counts as stuck: systemd may restart a healthy overlayd", "watchdog", 2*wdInterval, "stuck-after", stall)
		}
		eg.Go(func() error {
			return sd.watchdog(ctx, wdInterval, func(now time.Time) error { return set.Stalled(now, stall) })
		})
	}
	eg.Go(func() error { return set.Run(ctx) })
	eg.Go(func() error { return store.WatchNetworks(ctx, set.Kick) })
	eg.Go(func() error { return g.Run(ctx) })
	eg.Go(func() error { return live.Run(ctx, lease) })
	eg.Go(func() error { return h.runDoctor(ctx, set.Started, set.Kick, cfg.DoctorInterval) })
	// Also without the plugin socket: attachments of an earlier run's.
	eg.Go(func() error { return docker.Sweep(ctx, cfg.DockerSweep, set.Names) })
	if h.mesh != nil {
		eg.Go(func() error { return h.mesh.Run(ctx) })
	}
	eg.Go(func() error {
		h.rejoin(ctx)
		return every(ctx, cfg.RejoinInterval, h.rejoin)
	})
	if cfg.ReloadKeys != nil {
		eg.Go(func() error { return h.reloadKeys(ctx, cfg.ReloadKeys) })
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
	if dockerSrv != nil {
		eg.Go(func() error {
			select {
			case err := <-dockerServeErr:
				if err != nil && !errors.Is(err, http.ErrServerClosed) {
					return fmt.Errorf("serve the Docker plugin socket: %w", err)
				}
				return nil
			case <-ctx.Done():
			}
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			return dockerSrv.Shutdown(sctx)
		})
	}
	if metricsListener != nil {
		eg.Go(func() error {
			return m.Serve(ctx, metricsListener, map[string]http.Handler{
				"/healthz": healthz(func(now time.Time) error { return set.Stalled(now, stallAfter(cfg.ResyncInterval)) }),
				"/readyz":  readyz(func(ctx context.Context) []string { return h.missing(ctx, set.Names()) }),
			})
		})
	}
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

// networkResync is how often the list of networks is read when no watch
// event came; networkRetry how long after a network failed to start it is
// tried again (jittered down to half).
const (
	networkResync = 10 * time.Second
	networkRetry  = 2 * time.Second
)

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
	ecfg.Logger = cfg.Logger.With("component", "etcd-client")
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

// host is the host runtime: what every network on this host shares
// (identity, etcd, netlink, gossip, liveness, the allocation file, the
// host veths, metrics), and the host-wide loops.
type host struct {
	cfg     Config
	log     *slog.Logger
	id      overlay.HostID
	started time.Time
	// embedded is whether overlayd runs the etcd it uses; gossipAddr is
	// the host:port gossip listens on, as the host record says.
	embedded   bool
	gossipAddr string
	mac        net.HardwareAddr
	ul         vxlan.Underlay
	nl         *netlink.Handle
	nlNeigh    *vxlan.NeighSocket // the dataplanes' FDB and neighbour dumps, or nil (vxlan.New)
	store      *etcd.Store
	allocs     *local.DB
	gossip     *gossip.Gossip
	live       *etcd.Liveness
	metrics    *metrics.Metrics
	links      attach.HostLinks
	svc        *attach.Service
	dp         overlay.Dataplane
	dir        *hostDirectory
	fw         Firewall
	// fwWrites and fwFailures count the firewall's rewrites and failed
	// writes; fwLastErr is the last failure logged (converge writes it,
	// and the network set runs one converge at a time).
	fwWrites, fwFailures atomic.Uint64
	fwLastErr            string
	// doctorStats are the counts of the doctor's last periodic run.
	doctorStats doctorStats
	// mesh probes the peers across the overlay; nil when it is off.
	mesh *mesh.Prober
}

// Firewall is the host's nftables table (firewall.Table): isolation
// between networks and their egress masquerade.
type Firewall interface {
	// Set converges the rules to the networks and reports whether it
	// changed them.
	Set(networks []overlay.Network) (bool, error)
}

// removeNetwork removes network name from this host: the host veths of
// the containers of list (logged, with why, when there are any), its
// devices and this host's record of its allocations. The caller holds the
// network's lock.
func (h *host) removeNetwork(ctx context.Context, name string, list []overlay.Allocation, why string) {
	var cut []string
	for _, al := range list {
		veth := overlay.HostVethName(name, al.Key)
		if err := h.links.Delete(veth); err != nil {
			h.log.Warn("deleting the host veth of a container of a removed network", "network", name, "veth", veth, "err", err)
		}
		cut = append(cut, al.Key.String())
	}
	if len(cut) > 0 {
		slices.Sort(cut)
		h.log.Warn(why, "network", name, "containers", cut)
	}
	if err := h.dp.Delete(ctx, overlay.Network{Name: name}); err != nil {
		h.log.Warn("removing the devices of a deleted network", "network", name, "err", err)
	}
	if err := h.allocs.Drop(name); err != nil {
		h.log.Warn("dropping the allocations of a deleted network", "network", name, "err", err)
	}
	h.log.Info("network removed from this host", "network", name)
}

// recorded returns the allocations this host's record holds of network
// name, which no runtime serves.
func (h *host) recorded(ctx context.Context, name string) []overlay.Allocation {
	alloc, _, err := h.allocs.Allocator(overlay.Network{Name: name}, h.id, func() []netip.Prefix { return nil })
	if err != nil {
		h.log.Warn("reading the record of a removed network", "network", name, "err", err)
		return nil
	}
	list, _ := alloc.List(ctx)
	return list
}

// converge brings the host-wide state to the networks in etcd: the
// firewall's rules, and the removal of stale networks (sweep).
func (h *host) converge(ctx context.Context, defs []overlay.Network) {
	changed, err := h.fw.Set(defs)
	switch {
	case err != nil:
		h.fwFailures.Add(1)
		if msg := err.Error(); msg != h.fwLastErr {
			h.fwLastErr = msg
			h.log.Error("writing the firewall's rules failed: networks are not isolated from each other, and their egress is not masqueraded; retrying", "err", err)
		}
	case changed:
		h.fwWrites.Add(1)
		h.fwLastErr = ""
		h.log.Info("firewall rules written", "table", firewall.TableName, "networks", len(defs))
	}
	keep := make(map[string]bool, len(defs))
	for _, n := range defs {
		keep[n.Name] = true
	}
	h.sweep(ctx, keep)
}

// sweep removes the networks that this host holds devices or
// allocations of and that etcd no longer lists (keep): deleted while
// overlayd was down. A network whose lock another overlayd in this
// namespace holds is not ours, and is left alone.
func (h *host) sweep(ctx context.Context, keep map[string]bool) {
	stale := make(map[string]bool)
	if names, err := h.allocs.Networks(); err == nil {
		for _, n := range names {
			stale[n] = true
		}
	}
	if ls, err := h.nl.LinkList(); err == nil {
		for _, l := range ls {
			if name, ok := strings.CutPrefix(l.Attrs().Name, overlay.VXLANPrefix); ok {
				stale[name] = true
			}
		}
	}
	for name := range stale {
		if keep[name] {
			continue
		}
		lock, err := lockNetwork(name)
		if err != nil {
			continue
		}
		h.removeNetwork(ctx, name, h.recorded(ctx, name), "a network deleted while overlayd was down had containers on this host: they are cut off; remove them")
		lock.Unlock()
	}
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

// rejoin joins the hosts registered in etcd that gossip does not know: run
// periodically, it heals partitions and hosts that started at the same
// moment and found nobody.
func (h *host) rejoin(ctx context.Context) { h.join(ctx, h.hosts(ctx)) }

// hosts returns the host records in etcd; on a failure, what it could
// read (maybe nothing), after a warning.
func (h *host) hosts(ctx context.Context) []etcd.HostRecord {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	hosts, err := h.store.Hosts(ctx)
	if err != nil {
		h.log.Warn("listing host records", "err", err)
	}
	return hosts
}

// join joins over gossip the hosts that gossip does not know yet.
func (h *host) join(ctx context.Context, hosts []etcd.HostRecord) {
	known := make(map[overlay.HostID]bool)
	for _, m := range h.gossip.Members() {
		known[m.Host] = true
	}
	var addrs []string
	for _, rec := range hosts {
		if rec.Host != h.id && !known[rec.Host] && rec.Gossip != "" {
			addrs = append(addrs, rec.Gossip)
		}
	}
	if len(addrs) == 0 {
		return
	}
	jctx, cancel := context.WithTimeout(ctx, joinTimeout)
	defer cancel()
	n, err := h.gossip.Join(jctx, addrs)
	if err != nil && n == 0 {
		h.log.Warn("no registered host answered gossip; will retry", "hosts", len(addrs), "err", err)
		return
	}
	h.log.Info("joined gossip", "contacted", n, "of", len(addrs))
}

// registerMetrics exports the host's own state: liveness, firewall,
// gossip, and the other hosts by their state in gossip.
func (h *host) registerMetrics() {
	h.metrics.Host(func() metrics.HostStats {
		gs := h.gossip.Stats()
		findings, lastRun := h.doctorStats.get()
		return metrics.HostStats{
			Liveness:               h.live.Alive(),
			LivenessLost:           h.live.Lost(),
			FirewallWrites:         h.fwWrites.Load(),
			FirewallFailures:       h.fwFailures.Load(),
			GossipMembers:          gs.Members,
			GossipRejectedMetadata: gs.RejectedMetas,
			Gossip:                 metrics.GossipTraffic(gs.Traffic), // the same fields
			Peers:                  peerStates(h.id, h.dir.Known(), h.gossip.State),
			DoctorFindings:         findings,
			DoctorLastRun:          lastRun,
			Mesh:                   h.meshStats(),
		}
	})
}

// peerStates counts the hosts registered in etcd, self left out, by their
// state in gossip (metrics.PeerStates).
func peerStates(self overlay.HostID, registered []overlay.HostID, state func(overlay.HostID) gossip.State) map[string]int {
	out := make(map[string]int, len(metrics.PeerStates))
	for _, host := range registered {
		if host == self {
			continue
		}
		switch state(host) {
		case gossip.Alive:
			out["alive"]++
		case gossip.Suspect:
			out["suspect"]++
		case gossip.Departed:
			out["dead"]++
		default:
			out["remembered"]++
		}
	}
	return out
}

// meshStats returns the health mesh's figures for the metrics; nil when
// it is off.
func (h *host) meshStats() *metrics.MeshStats {
	if h.mesh == nil {
		return nil
	}
	out := &metrics.MeshStats{Probes: h.mesh.Counts()}
	for _, st := range h.mesh.States() {
		out.Peers = append(out.Peers, metrics.MeshPeer{Network: st.Network, Peer: string(st.Peer), State: st.Word(),
			Reachable: st.Reachable, MTUOK: st.MTUOK, RTT: st.RTT})
	}
	return out
}
