// Package daemon composes overlayd: identity, etcd (remote or embedded),
// the network definition, the block lease, gossip, the reconcile loop,
// the CNI socket and metrics. cmd/overlayd only turns flags into a Config.
package daemon

import (
	"log/slog"
	"math"
	"net/netip"
	"time"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/gossip"
	"github.com/overlaynet/overlay/ipam"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/mesh"
)

// Config is everything overlayd needs to run on one host.
type Config struct {
	// DataDir holds the host's identity and, when embedded, etcd's data.
	DataDir string
	// Socket is the Unix socket the CNI plugin talks to.
	Socket string
	// Etcd says how to reach etcd; no endpoints means run an embedded
	// etcd in DataDir.
	Etcd etcd.ClientConfig
	// EtcdPrefix is the key prefix of all overlay state in etcd.
	EtcdPrefix string
	// EmbeddedClientURL is where an embedded etcd serves clients.
	EmbeddedClientURL string
	// EmbeddedPeerURL is where an embedded etcd listens for peers.
	EmbeddedPeerURL string
	// Network is the network this host joins. It is created in etcd when
	// absent; a stored definition that differs is an error.
	Network overlay.Network
	// UnderlayAddr is the local underlay address; invalid means the
	// address of the interface holding the IPv4 default route.
	UnderlayAddr netip.Addr
	// GossipPort is the TCP and UDP port of memberlist.
	GossipPort int
	// GossipKeyFile is the file of the keys that encrypt and authenticate
	// gossip (see gossip.ParseKeys); "" leaves gossip unencrypted.
	GossipKeyFile string
	// ReloadKeys, when not nil, makes overlayd read GossipKeyFile again
	// after every value it receives (overlayd sends SIGHUP there), so that
	// keys rotate without a restart.
	ReloadKeys <-chan struct{}
	// MetricsAddr is where /metrics is served; "" disables it.
	MetricsAddr string
	// DockerSocket is where Docker's network and IPAM plugin protocols
	// are served; "" disables them.
	DockerSocket string
	// ResyncInterval is how often the dataplane is compared with the
	// desired state when nothing changed.
	ResyncInterval time.Duration
	// VerifyInterval is how often the host checks in etcd that its blocks
	// are still its own.
	VerifyInterval time.Duration
	// MaxBlocks caps the blocks of the network this host holds.
	MaxBlocks int
	// IdleBlock is how long a block other than the host's last stays
	// empty before it is given back.
	IdleBlock time.Duration
	// ReclaimAfter is how long a host's liveness key must have been gone
	// before its blocks are freed for others.
	ReclaimAfter time.Duration
	// RejoinInterval is how often hosts registered in etcd but missing
	// from gossip are joined again.
	RejoinInterval time.Duration
	// OrphanGrace is how long after start overlayd waits before it
	// releases the addresses of containers whose veth is gone: longer than
	// any plugin request from before the start can last.
	OrphanGrace time.Duration
	// DockerSweep is how often the Docker driver looks for attachments
	// dockerd left (dockerBackend.Sweep); one found twice in a row is
	// released.
	DockerSweep time.Duration
	// DoctorInterval is how often overlayd runs the doctor's checks on
	// its host and stores the report in etcd.
	DoctorInterval time.Duration
	// NoMesh turns the health mesh off.
	NoMesh bool
	// MeshInterval is how often the health mesh probes each peer, while
	// MeshRate allows.
	MeshInterval time.Duration
	// MeshRate is the health mesh's budget: peers probed per second at
	// most.
	MeshRate float64
	// Logger receives every log line.
	Logger *slog.Logger
}

// withDefaults returns c with every zero field that must not be zero
// (logger, intervals, URLs) set to its default.
func (c Config) withDefaults() Config {
	def := DefaultConfig()
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	for _, f := range []struct{ v, d *time.Duration }{
		{&c.ResyncInterval, &def.ResyncInterval},
		{&c.VerifyInterval, &def.VerifyInterval},
		{&c.IdleBlock, &def.IdleBlock},
		{&c.ReclaimAfter, &def.ReclaimAfter},
		{&c.RejoinInterval, &def.RejoinInterval},
		{&c.OrphanGrace, &def.OrphanGrace},
		{&c.DoctorInterval, &def.DoctorInterval},
		{&c.DockerSweep, &def.DockerSweep},
		{&c.MeshInterval, &def.MeshInterval},
		{&c.Etcd.DialTimeout, &def.Etcd.DialTimeout},
	} {
		if *f.v <= 0 {
			*f.v = *f.d
		}
	}
	if !(c.MeshRate > 0) || math.IsInf(c.MeshRate, 0) { // NaN too
		c.MeshRate = def.MeshRate
	}
	for _, f := range []struct{ v, d *string }{
		{&c.DataDir, &def.DataDir},
		{&c.Socket, &def.Socket},
		{&c.EtcdPrefix, &def.EtcdPrefix},
		{&c.EmbeddedClientURL, &def.EmbeddedClientURL},
		{&c.EmbeddedPeerURL, &def.EmbeddedPeerURL},
	} {
		if *f.v == "" {
			*f.v = *f.d
		}
	}
	return c
}

// DefaultConfig returns the defaults of every field; Logger is left nil
// (the caller sets it).
func DefaultConfig() Config {
	return Config{
		DataDir:           "/var/lib/overlay",                              // FHS state directory
		Socket:            cnirpc.DefaultSocket,                            // /run/overlay/overlayd.sock
		Etcd:              etcd.ClientConfig{DialTimeout: 5 * time.Second}, // no endpoints: embedded
		EtcdPrefix:        etcd.DefaultPrefix,                              // /overlay/v1/
		EmbeddedClientURL: "http://127.0.0.1:2379",                         // etcd's usual client port, loopback only
		EmbeddedPeerURL:   "http://127.0.0.1:2380",                         // etcd's usual peer port, loopback only
		Network: overlay.Network{ // the single network of the default setup
			Name:      "default",
			CIDR:      netip.MustParsePrefix("10.244.0.0/16"), // 1024 blocks of 64 addresses
			BlockBits: overlay.DefaultBlockBits,
			VNI:       overlay.DefaultVNI,
			Port:      overlay.DefaultPort,
		},
		UnderlayAddr:   netip.Addr{},                  // from the default route
		GossipPort:     gossip.DefaultPort,            // 7946, as Serf and Docker use
		GossipKeyFile:  "",                            // unencrypted, with a warning at start
		MetricsAddr:    "127.0.0.1:9476",              // loopback only; expose deliberately
		DockerSocket:   DefaultDockerSocket,           // /run/docker/plugins/overlaynet.sock
		ResyncInterval: overlay.DefaultResyncInterval, // 5s
		VerifyInterval: ipam.DefaultVerifyInterval,    // 1m, one read
		MaxBlocks:      ipam.DefaultMaxBlocks,         // 16 blocks of /26: 976 containers
		IdleBlock:      ipam.DefaultIdleBlock,         // 10m
		ReclaimAfter:   etcd.DefaultReclaimAfter,      // 24h: a host may be down for a day
		RejoinInterval: 30 * time.Second,              // heals partitions and simultaneous starts
		OrphanGrace:    30 * time.Second,              // the plugin's request timeout
		DoctorInterval: 5 * time.Minute,               // a few reads of etcd and the kernel per network
		DockerSweep:    time.Minute,                   // dockerd wires an address in milliseconds
		MeshInterval:   mesh.DefaultInterval,          // 10s per peer, while the budget allows
		MeshRate:       mesh.DefaultRate,              // 20 peers/s: 1000 peers every 50 s
	}
}
