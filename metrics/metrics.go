// Package metrics defines overlayd's Prometheus metrics on a registry of
// its own (never the global one) and serves them over HTTP.
//
// The host's state is one collector (Host) and each network's another
// (Network), registered while the network's runtime runs on the host:
// each reads its state once per scrape, through a function the daemon
// gives it, so that one scrape sees one network's figures from one moment
// and a deleted network's series disappear with one call.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/overlaynet/overlay/internal/version"
)

// namespace prefixes every metric name.
const namespace = "overlay"

// Buckets of the latency histograms.
var (
	// cniBuckets: 0.5 ms doubling to about 4 s.
	cniBuckets = prometheus.ExponentialBuckets(0.0005, 2, 14)
	// flushBuckets: 0.25 ms doubling to about 2 s; an fsync on a quiet
	// SSD takes a millisecond or two.
	flushBuckets = prometheus.ExponentialBuckets(0.00025, 2, 14)
	// passBuckets: 1 ms doubling to about 8 s; a pass gives etcd at most
	// 3 s.
	passBuckets = prometheus.ExponentialBuckets(0.001, 2, 14)
	// etcdBuckets: 0.5 ms doubling to about 8 s; a request gets at most
	// 10 s.
	etcdBuckets = prometheus.ExponentialBuckets(0.0005, 2, 15)
)

// PeerStates are the values of overlay_peers' state label, in order:
// alive (a live gossip member), dead (a member since this overlayd
// started that left or failed since; memberlist does not tell the two
// apart, nor say which members it suspects) and remembered (not heard of
// in gossip since this overlayd started).
var PeerStates = []string{"alive", "suspect", "dead", "remembered"}

// Metrics are overlayd's metrics. Its methods are safe for concurrent use.
type Metrics struct {
	// Registry holds every metric below plus Go and process metrics.
	Registry *prometheus.Registry
	// MirrorFailures counts failed copies of this host's allocations to
	// etcd; each is retried a second later.
	MirrorFailures prometheus.Counter

	cniRequests     *prometheus.CounterVec
	cniDuration     *prometheus.HistogramVec
	cniConfirmation prometheus.Histogram
	etcd            *grpcprom.ClientMetrics // set by EtcdClientOptions
}

// New returns the metrics on a fresh registry, with the build information
// of build.
func New(build version.Info) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		MirrorFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "ipam", Name: "mirror_failures_total",
			Help: "Failed copies of this host's allocations to etcd (each retried a second later).",
		}),
		cniRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Subsystem: "cni", Name: "requests_total",
			Help: "CNI socket requests by operation and result (ok, or the kind of CNI error).",
		}, []string{"op", "result"}),
		cniDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "cni", Name: "request_duration_seconds",
			Help:    "Time overlayd took to answer CNI socket requests (an early ADD: to its early answer).",
			Buckets: cniBuckets,
		}, []string{"op"}),
		cniConfirmation: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "cni", Name: "confirmation_duration_seconds",
			Help:    "Time from an early ADD's request to its confirmation (the allocation durable on disk).",
			Buckets: cniBuckets,
		}),
	}
	m.Registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: namespace, Name: "build_info",
			Help:        "Always 1; the labels say which build of overlayd runs.",
			ConstLabels: prometheus.Labels{"version": build.Version, "revision": build.Revision, "goversion": build.GoVersion},
		}, func() float64 { return 1 }),
		m.MirrorFailures, m.cniRequests, m.cniDuration, m.cniConfirmation,
	)
	return m
}

// ObserveCNI counts and times one CNI socket request: its operation, its
// result ("ok" or the kind of error), how long it took to the answer and,
// for an early ADD, to the confirmation (0 for any other request).
func (m *Metrics) ObserveCNI(op, result string, answer, confirmation time.Duration) {
	m.cniRequests.WithLabelValues(op, result).Inc()
	m.cniDuration.WithLabelValues(op).Observe(answer.Seconds())
	if confirmation > 0 {
		m.cniConfirmation.Observe(confirmation.Seconds())
	}
}

// EtcdClientOptions returns the gRPC options that count and time the
// requests of an etcd client, by method and gRPC code, in
// overlay_etcd_grpc_client_*; call it once per registry.
func (m *Metrics) EtcdClientOptions() []grpc.DialOption {
	cm := grpcprom.NewClientMetrics(
		grpcprom.WithClientCounterOptions(grpcprom.WithNamespace(namespace), grpcprom.WithSubsystem("etcd")),
		grpcprom.WithClientHandlingTimeHistogram(
			grpcprom.WithHistogramNamespace(namespace), grpcprom.WithHistogramSubsystem("etcd"),
			grpcprom.WithHistogramBuckets(etcdBuckets)),
	)
	m.Registry.MustRegister(cm)
	m.etcd = cm
	return []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(cm.UnaryClientInterceptor()),
		grpc.WithChainStreamInterceptor(cm.StreamClientInterceptor()),
	}
}

// GossipTraffic counts what gossip sent and received.
type GossipTraffic struct {
	// PacketsSent and PacketsReceived count UDP messages (probes, acks,
	// gossip), BytesSent and BytesReceived their bytes.
	PacketsSent, PacketsReceived, BytesSent, BytesReceived uint64
	// StreamsOpened and StreamsAccepted count TCP connections (joins,
	// push/pull state exchanges), StreamBytesSent and
	// StreamBytesReceived the bytes over them.
	StreamsOpened, StreamsAccepted, StreamBytesSent, StreamBytesReceived uint64
}

// HostStats is this host's own state, read at scrape time.
type HostStats struct {
	// Liveness is whether this host's liveness key exists in etcd, as far
	// as it knows; LivenessLost counts the times it was lost.
	Liveness     bool
	LivenessLost uint64
	// FirewallWrites and FirewallFailures count writes of the nftables
	// table and failed ones.
	FirewallWrites, FirewallFailures uint64
	// GossipMembers is the number of other live members with valid
	// metadata; GossipRejectedMetadata counts metadata rejected.
	GossipMembers          int
	GossipRejectedMetadata uint64
	// Gossip is what gossip sent and received.
	Gossip GossipTraffic
	// Peers counts the other hosts registered in etcd by their state in
	// gossip, a key of PeerStates each.
	Peers map[string]int
	// DoctorFindings counts the findings of the doctor's last periodic
	// run by severity ("error", "warning"); DoctorLastRun is when it
	// ended, zero before the first.
	DoctorFindings map[string]int
	DoctorLastRun  time.Time
	// Mesh is the health mesh's state; nil when it is off.
	Mesh *MeshStats
}

// MeshStats is the health mesh's state on this host.
type MeshStats struct {
	// Peers are the pairs of this host and a peer, one per network,
	// probed at least once.
	Peers []MeshPeer
	// Probes counts the probes sent by size (MeshSizes) and result
	// (MeshResults).
	Probes map[[2]string]uint64
}

// MeshPeer is one pair of the health mesh.
type MeshPeer struct {
	// Network is the network's name, Peer the peer's host ID.
	Network, Peer string
	// State is a key of MeshStates.
	State string
	// Reachable and MTUOK say whether small and full-MTU probes are
	// answered; RTT is the last small probe's round trip.
	Reachable, MTUOK bool
	RTT              time.Duration
}

// MeshStates, MeshSizes and MeshResults are the values of the mesh
// metrics' state, size and result labels.
var (
	MeshStates  = []string{"reachable", "mtu", "unreachable", "unknown"}
	MeshSizes   = []string{"small", "large"}
	MeshResults = []string{"ok", "lost", "error"}
)

// DoctorSeverities are the values of overlay_doctor_findings' severity
// label.
var DoctorSeverities = []string{"error", "warning"}

// Host registers the collector of this host's state, which calls stats
// once per scrape; stats must be safe for concurrent use and must not
// block on the network.
func (m *Metrics) Host(stats func() HostStats) {
	m.Registry.MustRegister(&hostCollector{stats: stats})
}

var (
	descLiveness = prometheus.NewDesc("overlay_ipam_liveness",
		"1 while this host's liveness key exists in etcd, as far as it knows; 0 while it is being created again.", nil, nil)
	descLivenessLost = prometheus.NewDesc("overlay_ipam_liveness_lost_total",
		"Times this host's liveness key was lost (its lease expired, as in a quorum loss longer than its TTL) and created again.", nil, nil)
	descFirewallWrites = prometheus.NewDesc("overlay_firewall_writes_total",
		"Times the overlay's nftables table was written because it differed from the networks in etcd (each network created or deleted, or the table changed by hand).", nil, nil)
	descFirewallFailures = prometheus.NewDesc("overlay_firewall_failures_total",
		"Failed writes of the overlay's nftables table: while they fail, networks are not isolated from each other.", nil, nil)
	descGossipMembers = prometheus.NewDesc("overlay_gossip_members",
		"Other live hosts in gossip with valid metadata.", nil, nil)
	descGossipRejected = prometheus.NewDesc("overlay_gossip_rejected_metadata_total",
		"Gossip metadata rejected as malformed.", nil, nil)
	descGossipMessages = prometheus.NewDesc("overlay_gossip_messages_total",
		"Gossip messages by direction (sent, received) and transport: udp counts packets (probes, acks, gossip), tcp connections (joins, state exchanges).", []string{"direction", "transport"}, nil)
	descGossipBytes = prometheus.NewDesc("overlay_gossip_bytes_total",
		"Bytes of gossip by direction (sent, received) and transport (udp, tcp), encryption included.", []string{"direction", "transport"}, nil)
	descDoctorFindings = prometheus.NewDesc("overlay_doctor_findings",
		"Findings of the doctor's last periodic run on this host, by severity: differences between the kernel and what etcd and gossip say it should hold (overlayctl doctor names them).", []string{"severity"}, nil)
	descDoctorLastRun = prometheus.NewDesc("overlay_doctor_last_run_timestamp_seconds",
		"When the doctor's last periodic run on this host ended, in seconds since the Unix epoch; 0 before the first.", nil, nil)
	descMeshReachable = prometheus.NewDesc("overlay_mesh_peer_reachable",
		"1 while the peer answers small probes sent across the overlay from this host (the health mesh), 0 once two in a row were lost.", []string{"network", "peer"}, nil)
	descMeshMTU = prometheus.NewDesc("overlay_mesh_peer_mtu_ok",
		"1 while the peer answers probes of the network's full MTU that may not be fragmented, 0 once two in a row were lost: a path MTU below the overlay's.", []string{"network", "peer"}, nil)
	descMeshRTT = prometheus.NewDesc("overlay_mesh_peer_rtt_seconds",
		"Round trip of the last small probe the peer answered across the overlay.", []string{"network", "peer"}, nil)
	descMeshPeers = prometheus.NewDesc("overlay_mesh_peers",
		"Peers of each network by the health mesh's state: reachable, mtu (small probes answered, full-MTU ones lost), unreachable, unknown (no answer yet, and not two probes lost in a row).", []string{"network", "state"}, nil)
	descMeshProbes = prometheus.NewDesc("overlay_mesh_probes_total",
		"Probes the health mesh sent, by size (small, large: the network's MTU) and result (ok, lost, error: not sent).", []string{"size", "result"}, nil)
	descPeers = prometheus.NewDesc("overlay_peers",
		"Other hosts registered in etcd by their state in gossip: alive, suspect (alive, but this host's probes got no ack and memberlist has not declared it failed yet), dead (left or failed since this overlayd started), remembered (not heard of since it started). All are programmed from etcd.", []string{"state"}, nil)
)

// hostCollector is the collector of the host's own state.
type hostCollector struct{ stats func() HostStats }

func (c *hostCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descLiveness, descLivenessLost, descFirewallWrites, descFirewallFailures,
		descGossipMembers, descGossipRejected, descGossipMessages, descGossipBytes, descPeers, descDoctorFindings, descDoctorLastRun,
		descMeshReachable, descMeshMTU, descMeshRTT, descMeshPeers, descMeshProbes} {
		ch <- d
	}
}

func (c *hostCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	ch <- gauge(descLiveness, b2f(s.Liveness))
	ch <- counter(descLivenessLost, float64(s.LivenessLost))
	ch <- counter(descFirewallWrites, float64(s.FirewallWrites))
	ch <- counter(descFirewallFailures, float64(s.FirewallFailures))
	ch <- gauge(descGossipMembers, float64(s.GossipMembers))
	ch <- counter(descGossipRejected, float64(s.GossipRejectedMetadata))
	g := s.Gossip
	ch <- counter(descGossipMessages, float64(g.PacketsSent), "sent", "udp")
	ch <- counter(descGossipMessages, float64(g.PacketsReceived), "received", "udp")
	ch <- counter(descGossipMessages, float64(g.StreamsOpened), "sent", "tcp")
	ch <- counter(descGossipMessages, float64(g.StreamsAccepted), "received", "tcp")
	ch <- counter(descGossipBytes, float64(g.BytesSent), "sent", "udp")
	ch <- counter(descGossipBytes, float64(g.BytesReceived), "received", "udp")
	ch <- counter(descGossipBytes, float64(g.StreamBytesSent), "sent", "tcp")
	ch <- counter(descGossipBytes, float64(g.StreamBytesReceived), "received", "tcp")
	for _, state := range PeerStates {
		ch <- gauge(descPeers, float64(s.Peers[state]), state)
	}
	for _, sev := range DoctorSeverities {
		ch <- gauge(descDoctorFindings, float64(s.DoctorFindings[sev]), sev)
	}
	ch <- gauge(descDoctorLastRun, unixSeconds(s.DoctorLastRun))
	if m := s.Mesh; m != nil {
		counts := make(map[string]map[string]int)
		for _, p := range m.Peers {
			// A pair without a state yet has no series of its own, and
			// one never answered no round trip.
			if p.State != "unknown" {
				ch <- gauge(descMeshReachable, b2f(p.Reachable), p.Network, p.Peer)
				ch <- gauge(descMeshMTU, b2f(p.MTUOK), p.Network, p.Peer)
			}
			if p.RTT > 0 {
				ch <- gauge(descMeshRTT, p.RTT.Seconds(), p.Network, p.Peer)
			}
			if counts[p.Network] == nil {
				counts[p.Network] = make(map[string]int)
			}
			counts[p.Network][p.State]++
		}
		for network, byState := range counts {
			for _, state := range MeshStates {
				ch <- gauge(descMeshPeers, float64(byState[state]), network, state)
			}
		}
		for _, size := range MeshSizes {
			for _, res := range MeshResults {
				ch <- counter(descMeshProbes, float64(m.Probes[[2]string{size, res}]), size, res)
			}
		}
	}
}

// DataplaneKinds are the values of the dataplane metrics' kind label.
var DataplaneKinds = []string{"fdb", "neighbour", "route", "gateway"}

// NetworkStats is one network's state on this host, read at scrape time.
type NetworkStats struct {
	// PeersProgrammed is the number of other hosts in the dataplane's
	// configuration of the last pass.
	PeersProgrammed int
	// Entries counts the dataplane's entries after the last pass, and
	// Added and Deleted the changes it made since the start, by kind (a
	// key of DataplaneKinds each).
	Entries        map[string]int
	Added, Deleted map[string]uint64

	// Blocks, MaxBlocks, Addresses, FreeAddresses and StrandedAddresses
	// are the pool's and the allocations' figures now.
	Blocks, MaxBlocks, Addresses, FreeAddresses, StrandedAddresses int
	// BlockClaims ... ReclaimedBlocks count the pool's events.
	BlockClaims, BlockClaimFailures, BlockClaimWaits, BlockGiveBacks, BlocksLost, ReclaimedBlocks uint64
	// MirrorLastSuccess is when the allocations were last copied to
	// etcd; zero before the first copy.
	MirrorLastSuccess time.Time

	// Passes and PassFailures count reconcile passes and failed ones;
	// LastSuccess is when the last pass that succeeded ended, zero before
	// the first.
	Passes, PassFailures uint64
	LastSuccess          time.Time
	// LastPassTook is how long the last pass took.
	LastPassTook time.Duration
	// Disagreements is the number of fields of gossip metadata that
	// differ from etcd in the last pass; DisagreeingMembers counts each
	// new disagreement.
	Disagreements      int
	DisagreeingMembers uint64
}

// Network is the collector of one network's state on this host. Its
// methods are safe for concurrent use.
type Network struct {
	reg   *prometheus.Registry
	name  string
	stats func() NetworkStats

	passDuration  prometheus.Histogram
	flushDuration prometheus.Histogram
	descs         networkDescs
}

// networkDescs are the descriptions of one network's metrics, with its
// name as the constant label network (two collectors may not share a
// description).
type networkDescs struct {
	peers, entries, changes                                                          *prometheus.Desc
	blocks, maxBlocks, addresses, free, stranded                                     *prometheus.Desc
	claims, claimFailures, claimWaits, giveBacks, lost, reclaimed, mirrorLastSuccess *prometheus.Desc
	passes, failures, lastSuccess, lastPass, disagreements, disagreeing              *prometheus.Desc
}

func newNetworkDescs(labels prometheus.Labels) networkDescs {
	d := func(subsystem, name, help string, variable ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, subsystem, name), help, variable, labels)
	}
	return networkDescs{
		peers:   d("dataplane", "peers", "Other hosts programmed in the dataplane."),
		entries: d("dataplane", "entries", "Entries of the network's devices after the last pass, by kind: fdb and neighbour (one per peer), route (one per peer's block), gateway (one per block of this host).", "kind"),
		changes: d("dataplane", "changes_total", "Dataplane entries added or deleted (op) by kind: at start, and as hosts, blocks and hand-made changes come and go.", "kind", "op"),

		blocks:    d("ipam", "blocks", "Blocks this host allocates from."),
		maxBlocks: d("ipam", "max_blocks", "The cap on the blocks this host may hold (--max-blocks)."),
		addresses: d("ipam", "addresses", "Addresses allocated to containers on this host."),
		free:      d("ipam", "free_addresses", "Free addresses in the blocks this host holds."),
		stranded:  d("ipam", "stranded_addresses", "Addresses containers on this host hold in blocks it lost (reclaimed or removed while it was away): recreate those containers."),

		claims:            d("ipam", "block_claims_total", "Blocks this host claimed."),
		claimFailures:     d("ipam", "block_claim_failures_total", "Block claims that failed for another reason than a full network (etcd unreachable)."),
		claimWaits:        d("ipam", "block_claim_waits_total", "ADDs that found every held block full and waited for a claim."),
		giveBacks:         d("ipam", "block_give_backs_total", "Empty blocks this host gave back."),
		lost:              d("ipam", "blocks_lost_total", "Blocks this host found taken by another host or removed in etcd."),
		reclaimed:         d("ipam", "reclaimed_blocks_total", "Blocks of gone hosts (liveness key gone for the reclaim period) this host freed."),
		mirrorLastSuccess: d("ipam", "mirror_last_success_timestamp_seconds", "When this host's allocations were last copied to etcd, in Unix seconds; 0 before the first copy."),

		passes:        d("reconcile", "passes_total", "Reconcile passes, failed ones included."),
		failures:      d("reconcile", "failures_total", "Reconcile passes that failed."),
		lastSuccess:   d("reconcile", "last_success_timestamp_seconds", "When the last reconcile pass that succeeded ended, in Unix seconds; 0 before the first."),
		lastPass:      d("reconcile", "last_pass_seconds", "How long the last reconcile pass took: its reads of etcd and the dataplane's convergence."),
		disagreements: d("gossip", "disagreements", "Fields of live members' gossip metadata that differ from etcd in the last pass (ignored)."),
		disagreeing:   d("gossip", "disagreeing_members_total", "Times a live member's gossip metadata came to differ from etcd (each logged once at WARN)."),
	}
}

func (d networkDescs) all() []*prometheus.Desc {
	return []*prometheus.Desc{d.peers, d.entries, d.changes, d.blocks, d.maxBlocks, d.addresses, d.free, d.stranded,
		d.claims, d.claimFailures, d.claimWaits, d.giveBacks, d.lost, d.reclaimed, d.mirrorLastSuccess,
		d.passes, d.failures, d.lastSuccess, d.lastPass, d.disagreements, d.disagreeing}
}

// Network returns the collector of network name's state, which calls
// stats once per scrape (stats must be safe for concurrent use and must
// not block on the network). Its histograms observe at once; its metrics
// are scraped once it is registered.
func (m *Metrics) Network(name string, stats func() NetworkStats) *Network {
	labels := prometheus.Labels{"network": name}
	n := &Network{
		reg:   m.Registry,
		name:  name,
		stats: stats,
		passDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "reconcile", Name: "pass_duration_seconds",
			Help:        "Time reconcile passes took: reading block owners and host records from etcd, and converging the dataplane.",
			Buckets:     passBuckets,
			ConstLabels: labels,
		}),
		flushDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Subsystem: "ipam", Name: "flush_duration_seconds",
			Help:        "Time ADDs waited for their allocation to be durable on disk (a group commit to the allocation file).",
			Buckets:     flushBuckets,
			ConstLabels: labels,
		}),
		descs: newNetworkDescs(labels),
	}
	return n
}

// Register adds the network's metrics to the registry. It fails when
// those of a network of the same name are there.
func (n *Network) Register() error {
	if err := n.reg.Register(n); err != nil {
		return fmt.Errorf("metrics of network %s: %w", n.name, err)
	}
	return nil
}

// ObservePass records how long a reconcile pass took.
func (n *Network) ObservePass(took time.Duration) { n.passDuration.Observe(took.Seconds()) }

// ObserveFlush records how long an ADD waited for its allocation to be
// durable.
func (n *Network) ObserveFlush(took time.Duration) { n.flushDuration.Observe(took.Seconds()) }

// Unregister removes the network's metrics from the registry.
func (n *Network) Unregister() { n.reg.Unregister(n) }

// Describe implements prometheus.Collector.
func (n *Network) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range n.descs.all() {
		ch <- d
	}
	n.passDuration.Describe(ch)
	n.flushDuration.Describe(ch)
}

// Collect implements prometheus.Collector.
func (n *Network) Collect(ch chan<- prometheus.Metric) {
	s := n.stats()
	d := n.descs
	ch <- gauge(d.peers, float64(s.PeersProgrammed))
	for _, kind := range DataplaneKinds {
		ch <- gauge(d.entries, float64(s.Entries[kind]), kind)
		ch <- counter(d.changes, float64(s.Added[kind]), kind, "add")
		ch <- counter(d.changes, float64(s.Deleted[kind]), kind, "delete")
	}
	ch <- gauge(d.blocks, float64(s.Blocks))
	ch <- gauge(d.maxBlocks, float64(s.MaxBlocks))
	ch <- gauge(d.addresses, float64(s.Addresses))
	ch <- gauge(d.free, float64(s.FreeAddresses))
	ch <- gauge(d.stranded, float64(s.StrandedAddresses))
	ch <- counter(d.claims, float64(s.BlockClaims))
	ch <- counter(d.claimFailures, float64(s.BlockClaimFailures))
	ch <- counter(d.claimWaits, float64(s.BlockClaimWaits))
	ch <- counter(d.giveBacks, float64(s.BlockGiveBacks))
	ch <- counter(d.lost, float64(s.BlocksLost))
	ch <- counter(d.reclaimed, float64(s.ReclaimedBlocks))
	ch <- gauge(d.mirrorLastSuccess, unixSeconds(s.MirrorLastSuccess))
	ch <- counter(d.passes, float64(s.Passes))
	ch <- counter(d.failures, float64(s.PassFailures))
	ch <- gauge(d.lastSuccess, unixSeconds(s.LastSuccess))
	ch <- gauge(d.lastPass, s.LastPassTook.Seconds())
	ch <- gauge(d.disagreements, float64(s.Disagreements))
	ch <- counter(d.disagreeing, float64(s.DisagreeingMembers))
	n.passDuration.Collect(ch)
	n.flushDuration.Collect(ch)
}

func gauge(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func counter(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// unixSeconds is t in Unix seconds, 0 for the zero time.
func unixSeconds(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.UnixNano()) / 1e9
}

// Serve serves /metrics, and handlers at their patterns, on l until ctx
// is done. The caller opens l, so that an address already in use is found
// before the daemon reports ready.
func (m *Metrics) Serve(ctx context.Context, l net.Listener, handlers map[string]http.Handler) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	for pattern, h := range handlers {
		mux.Handle(pattern, h)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics: %w", err)
	}
	return ctx.Err()
}
