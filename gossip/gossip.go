// Package gossip tells the other hosts of the overlay who this host is and
// learns who they are, over hashicorp/memberlist.
//
// Every host gossips its host ID (the memberlist node name), its underlay
// address and the MAC address of its VXLAN devices, encoded in the
// memberlist node metadata. Members returns what the other live hosts say;
// it is an overlay.Membership. Block ownership is not gossiped: it lives
// in etcd alone. What members say is not verified here: the caller checks
// it against the host records in etcd, and trusts gossip only for which
// hosts are alive.
package gossip

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/overlaynet/overlay/overlay"
)

// Defaults of a Config.
const (
	// DefaultPort is the TCP and UDP port memberlist listens on, the same
	// as Consul's and Serf's LAN gossip port.
	DefaultPort = 7946
	// DefaultLeaveTimeout bounds how long Leave waits for the leave
	// message to be sent to another member.
	DefaultLeaveTimeout = 5 * time.Second
)

// joinParallelism is how many addresses Join contacts at once.
const joinParallelism = 4

// Sentinel errors.
var (
	// ErrClosed is returned by methods called after Shutdown or Leave.
	ErrClosed = errors.New("gossip: closed")
	// ErrMetaTooLarge is returned by New when the encoded metadata
	// exceeds memberlist.MetaMaxSize bytes, as it does for a very long
	// host ID.
	ErrMetaTooLarge = errors.New("gossip: metadata too large")
)

// Config configures a Gossip. The zero value of every optional field
// means its default; DefaultConfig spells the defaults out.
type Config struct {
	// Host is this host's ID, used as the memberlist node name. Required.
	Host overlay.HostID
	// Underlay is this host's underlay address, gossiped to the others.
	// Required.
	Underlay netip.Addr
	// VTEPMAC is the MAC address of this host's VXLAN devices, gossiped
	// to the others. Required; it must be a 6-byte MAC address.
	VTEPMAC net.HardwareAddr

	// BindAddr is the address memberlist listens on. The zero Addr means
	// all IPv4 addresses (0.0.0.0). Ignored when Transport is set.
	BindAddr netip.Addr
	// BindPort is the TCP and UDP port memberlist listens on; 0 lets the
	// kernel pick one (see LocalAddr). Ignored when Transport is set.
	BindPort int
	// AdvertiseAddr is the address the other hosts reach this one at. The
	// zero Addr means BindAddr when that is a specific address, else
	// Underlay: gossip then travels the same path as VXLAN packets.
	AdvertiseAddr netip.Addr
	// AdvertisePort is the port the other hosts reach this one at; 0
	// means the bound port.
	AdvertisePort int
	// Keys, when set, encrypt and authenticate gossip (AES-GCM): the
	// first key encrypts what this host sends, and a message is accepted
	// only when one of the keys decrypts it, so that a member without a
	// key can neither join nor inject. Each must be 16, 24 or 32 bytes
	// long (see ParseKeys). Nil means no encryption.
	Keys [][]byte

	// ProbeInterval is how often a random member is probed for failure
	// detection; 0 means memberlist's LAN default (1s).
	ProbeInterval time.Duration
	// ProbeTimeout is how long to wait for the answer to a probe before
	// trying indirect probes; it must be less than ProbeInterval. 0 means
	// memberlist's LAN default (500ms).
	ProbeTimeout time.Duration
	// GossipInterval is how often queued messages are gossiped; 0 means
	// memberlist's LAN default (200ms).
	GossipInterval time.Duration
	// PushPullInterval is how often the full state is exchanged with a
	// random member over TCP; 0 means memberlist's LAN default (30s).
	PushPullInterval time.Duration
	// TCPTimeout bounds one TCP exchange with a member, such as one
	// address of a Join; 0 means memberlist's LAN default (10s).
	TCPTimeout time.Duration
	// LeaveTimeout bounds how long Leave waits for the leave message to
	// be sent; 0 means DefaultLeaveTimeout.
	LeaveTimeout time.Duration

	// OnChange, if set, is called after another member joined, left,
	// failed or changed its metadata. It is called from one goroutine,
	// never concurrently and never while a lock of this package is held;
	// changes that happen while it runs are merged into one more call. It
	// must not block for long and must not call Shutdown or Leave. It is
	// typically a reconciler's Kick.
	OnChange func()
	// Logger receives this package's logs; memberlist's own logs go to it
	// at debug level. Nil discards them.
	Logger *slog.Logger
	// Transport, if set, replaces memberlist's UDP and TCP transport, for
	// example with a memberlist.MockNetwork transport in tests; its name
	// in the MockNetwork must be Host.
	Transport memberlist.Transport
}

// DefaultConfig returns a Config with every default spelled out; the
// caller sets Host, Underlay, VTEPMAC, OnChange and Logger. The timing is
// memberlist's LAN profile unchanged: a failed host is noticed within a
// few seconds, and a restarting overlayd is back before it is declared
// dead.
func DefaultConfig() Config {
	lan := memberlist.DefaultLANConfig()
	return Config{
		BindAddr:         netip.IPv4Unspecified(), // every IPv4 address
		BindPort:         DefaultPort,             // Serf's LAN port
		AdvertiseAddr:    netip.Addr{},            // BindAddr if specific, else Underlay
		AdvertisePort:    0,                       // the bound port
		Keys:             nil,                     // no encryption
		ProbeInterval:    lan.ProbeInterval,       // 1s
		ProbeTimeout:     lan.ProbeTimeout,        // 500ms, a LAN round trip with margin
		GossipInterval:   lan.GossipInterval,      // 200ms
		PushPullInterval: lan.PushPullInterval,    // 30s, repairs missed gossip
		TCPTimeout:       lan.TCPTimeout,          // 10s
		LeaveTimeout:     DefaultLeaveTimeout,     // 5s
	}
}

// Stats are counters about the membership.
type Stats struct {
	// Members is the number of other live members with valid metadata:
	// len(Members()).
	Members int
	// Rejected is the number of other live members ignored because their
	// metadata is invalid.
	Rejected int
	// RejectedMetas counts the metadata rejected since New; a member that
	// sends the same invalid metadata again is counted once.
	RejectedMetas uint64
	// Traffic is what was sent and received since New.
	Traffic Traffic
}

// Gossip is this host's membership in the overlay's gossip cluster. Its
// methods are safe for concurrent use.
type Gossip struct {
	host         overlay.HostID
	local        overlay.Member
	log          *slog.Logger
	onChange     func()
	leaveTimeout time.Duration

	ml        *memberlist.Memberlist
	localAddr netip.AddrPort

	kick       chan struct{} // capacity one: an OnChange call is due
	done       chan struct{} // closed by Shutdown
	notifyDone chan struct{} // closed when the OnChange goroutine returns

	// meta is this host's encoded metadata, at most MetaMaxSize bytes.
	// New sets it before memberlist starts, and it never changes: it
	// needs no lock.
	meta []byte

	// keyring holds the gossip keys, nil without encryption; memberlist
	// reads it concurrently, and it locks itself.
	keyring *memberlist.Keyring

	lifeMu sync.Mutex // serializes Leave and Shutdown; guards closed
	closed bool

	rejectedMetas atomic.Uint64
	traffic       counters

	mu sync.Mutex // guards nodes, departed and suspects
	// nodes holds every other live node by name, decoded or rejected.
	nodes map[string]node
	// departed holds the other nodes that were live since New and left
	// or failed since, by name.
	departed map[string]bool
	// suspects holds the live nodes this host's own probes got no ack
	// from, by name, with when memberlist said so (see suspected).
	suspects map[string]time.Time
	// suspectFor is how long a suspicion counts without news: the
	// longest memberlist waits before it declares a suspect failed.
	suspectFor time.Duration
}

// node is what is known about another live memberlist node.
type node struct {
	// member is the decoded metadata; valid when err is nil.
	member overlay.Member
	// err is why the metadata was rejected, or nil.
	err error
	// raw is the rejected metadata, to log and count each one once.
	raw []byte
}

var _ overlay.Membership = (*Gossip)(nil)

// New starts gossiping: it binds the transport, starts memberlist and
// returns once it is listening. It joins no one; see Join. The metadata,
// fixed for the Gossip's lifetime, is cfg's host ID, underlay address and
// VTEP MAC.
func New(cfg Config) (*Gossip, error) {
	if cfg.Host == "" {
		return nil, errors.New("gossip: config: Host is required")
	}
	if !cfg.Underlay.IsValid() {
		return nil, errors.New("gossip: config: Underlay is required")
	}
	if len(cfg.VTEPMAC) != macLen {
		return nil, fmt.Errorf("gossip: config: VTEPMAC %q is not a %d-byte MAC address", cfg.VTEPMAC, macLen)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g := &Gossip{
		host: cfg.Host,
		local: overlay.Member{
			Host:     cfg.Host,
			Underlay: cfg.Underlay,
			VTEPMAC:  slices.Clone(cfg.VTEPMAC),
		},
		log:          log,
		onChange:     cfg.OnChange,
		leaveTimeout: cmp.Or(cfg.LeaveTimeout, DefaultLeaveTimeout),
		kick:         make(chan struct{}, 1),
		done:         make(chan struct{}),
		notifyDone:   make(chan struct{}),
		nodes:        make(map[string]node),
		departed:     make(map[string]bool),
		suspects:     make(map[string]time.Time),
	}
	meta, err := g.encodeLocal()
	if err != nil {
		return nil, err
	}
	g.meta = meta
	if len(cfg.Keys) > 0 {
		if g.keyring, err = memberlist.NewKeyring(cfg.Keys, cfg.Keys[0]); err != nil {
			return nil, fmt.Errorf("gossip: config: keys: %w", err)
		}
	}

	mc := g.memberlistConfig(cfg)
	g.suspectFor = longestSuspicion(mc)
	next := cfg.Transport
	if next == nil {
		nt, port, err := netTransport(mc.BindAddr, mc.BindPort, mc)
		if err != nil {
			return nil, err
		}
		if mc.BindPort == 0 {
			mc.BindPort, mc.AdvertisePort = port, cmp.Or(cfg.AdvertisePort, port)
		}
		next = nt
	}
	transport := newCountingTransport(next, &g.traffic)
	mc.Transport = transport
	go g.notifyLoop()
	ml, err := memberlist.Create(mc)
	if err != nil {
		_ = transport.Shutdown()
		close(g.done)
		<-g.notifyDone
		return nil, fmt.Errorf("gossip: start memberlist: %w", err)
	}
	g.ml = ml
	self := ml.LocalNode()
	addr, _ := netip.AddrFromSlice(self.Addr)
	g.localAddr = netip.AddrPortFrom(addr.Unmap(), self.Port)
	g.log.Info("gossip started", "addr", g.localAddr)
	return g, nil
}

// memberlistConfig returns the memberlist configuration for cfg, starting
// from memberlist's LAN profile.
func (g *Gossip) memberlistConfig(cfg Config) *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.Name = string(cfg.Host)
	bind := cfg.BindAddr
	if !bind.IsValid() {
		bind = netip.IPv4Unspecified()
	}
	mc.BindAddr = bind.String()
	mc.BindPort = cfg.BindPort
	switch {
	case cfg.AdvertiseAddr.IsValid():
		mc.AdvertiseAddr = cfg.AdvertiseAddr.String()
	case bind.IsUnspecified():
		mc.AdvertiseAddr = cfg.Underlay.String()
	}
	// memberlist replaces AdvertisePort with the bound port when BindPort
	// is 0.
	mc.AdvertisePort = cmp.Or(cfg.AdvertisePort, cfg.BindPort)
	mc.Keyring = g.keyring
	// memberlist's defaults, spelled out: with a keyring, nothing
	// unencrypted is sent or accepted.
	mc.GossipVerifyIncoming = true
	mc.GossipVerifyOutgoing = true
	mc.ProbeInterval = cmp.Or(cfg.ProbeInterval, mc.ProbeInterval)
	mc.ProbeTimeout = cmp.Or(cfg.ProbeTimeout, mc.ProbeTimeout)
	mc.GossipInterval = cmp.Or(cfg.GossipInterval, mc.GossipInterval)
	mc.PushPullInterval = cmp.Or(cfg.PushPullInterval, mc.PushPullInterval)
	mc.TCPTimeout = cmp.Or(cfg.TCPTimeout, mc.TCPTimeout)
	mc.Delegate = delegate{g}
	mc.Events = events{g}
	mc.Ping = pings{g}
	mc.Logger = log.New(memberlistLog{g: g, log: g.log.With("component", "memberlist")}, "", 0)
	return mc
}

// longestSuspicion is how long memberlist suspects a node at most before
// it declares it failed, for a cluster of up to 1000 nodes (its timeout
// grows with log10 of the cluster's size), plus a probe interval.
func longestSuspicion(mc *memberlist.Config) time.Duration {
	return time.Duration(mc.SuspicionMult*mc.SuspicionMaxTimeoutMult*3)*mc.ProbeInterval + mc.ProbeInterval
}

// suspectLine is how memberlist logs that this host's probes of a node,
// direct, indirect and over TCP, got no ack, and it starts to suspect it:
// memberlist exposes suspicion nowhere else. TestSuspect fails if a
// memberlist upgrade changes the wording.
var suspectLine = regexp.MustCompile(`memberlist: Suspect (\S+) has failed, no acks received`)

// memberlistLog passes memberlist's log lines to slog at debug level,
// and notes the suspicions they report.
type memberlistLog struct {
	g   *Gossip
	log *slog.Logger
}

func (l memberlistLog) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	if m := suspectLine.FindStringSubmatch(line); m != nil {
		l.g.suspected(m[1])
	}
	l.log.Debug(line)
	return len(p), nil
}

// suspected notes that memberlist suspects node name.
func (g *Gossip) suspected(name string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, live := g.nodes[name]; live {
		g.suspects[name] = time.Now()
	}
}

// pings is the memberlist.PingDelegate of a Gossip: a direct ack from a
// node ends this host's suspicion of it.
type pings struct{ g *Gossip }

func (pings) AckPayload() []byte { return nil }

func (p pings) NotifyPingComplete(n *memberlist.Node, _ time.Duration, _ []byte) {
	p.g.mu.Lock()
	delete(p.g.suspects, n.Name)
	p.g.mu.Unlock()
}

// encodeLocal returns this host's metadata, or an error wrapping
// ErrMetaTooLarge.
func (g *Gossip) encodeLocal() ([]byte, error) {
	meta, err := encodeMeta(g.local)
	if err != nil {
		return nil, err
	}
	if len(meta) > memberlist.MetaMaxSize {
		return nil, fmt.Errorf("%w: %d bytes, the limit is %d: use a shorter host ID", ErrMetaTooLarge, len(meta), memberlist.MetaMaxSize)
	}
	return meta, nil
}

// Members returns the other live members whose metadata is valid, sorted
// by host ID. It does not block on the network. The result is the
// caller's to modify. After Shutdown it returns the last members seen.
func (g *Gossip) Members() []overlay.Member {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]overlay.Member, 0, len(g.nodes))
	for _, n := range g.nodes {
		if n.err == nil {
			out = append(out, cloneMember(n.member))
		}
	}
	slices.SortFunc(out, func(a, b overlay.Member) int { return cmp.Compare(a.Host, b.Host) })
	return out
}

// Stats returns counters about the membership. It does not block on the
// network.
func (g *Gossip) Stats() Stats {
	g.mu.Lock()
	defer g.mu.Unlock()
	var s Stats
	for _, n := range g.nodes {
		if n.err == nil {
			s.Members++
		} else {
			s.Rejected++
		}
	}
	s.RejectedMetas = g.rejectedMetas.Load()
	s.Traffic = g.traffic.load()
	return s
}

// State is what gossip knows of a host.
type State int

// The states of a host.
const (
	// Unknown: not heard of since New.
	Unknown State = iota
	// Alive: a live member, whatever its metadata.
	Alive
	// Departed: was a live member since New, and left or failed since.
	Departed
	// Suspect: a live member that this host's own probes (direct,
	// through others, and over TCP) got no ack from, which memberlist
	// has not declared failed yet, nor heard from since. A suspicion
	// that other hosts gossip is not seen here: memberlist reports only
	// its own.
	Suspect
)

// State returns what gossip knows of host, without blocking on the
// network.
func (g *Gossip) State(host overlay.HostID) State {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.nodes[string(host)]; ok {
		if at, ok := g.suspects[string(host)]; ok && time.Since(at) < g.suspectFor {
			return Suspect
		}
		return Alive
	}
	if g.departed[string(host)] {
		return Departed
	}
	return Unknown
}

// NumMembers returns the number of live memberlist nodes, this host and
// members with invalid metadata included. It does not block on the
// network.
func (g *Gossip) NumMembers() int {
	return g.ml.NumMembers()
}

// LocalAddr returns the address and port the other hosts join this one
// at: the advertised address and the bound port.
func (g *Gossip) LocalAddr() netip.AddrPort {
	return g.localAddr
}

// ErrNotEncrypted is returned by SetKeys for a Gossip started without
// keys: encryption cannot be turned on while running.
var ErrNotEncrypted = errors.New("gossip: started without keys: restart to encrypt")

// SetKeys replaces the gossip keys while running: keys[0] becomes the key
// this host encrypts with, and messages are accepted under any of keys.
// It does not block on the network. See ParseKeys for rotating a key.
func (g *Gossip) SetKeys(keys [][]byte) error {
	if g.keyring == nil {
		return ErrNotEncrypted
	}
	if len(keys) == 0 {
		return fmt.Errorf("gossip: set keys: %w", ErrNoKeys)
	}
	// Every key checked before the ring changes, so that a bad one
	// leaves it as it was.
	for _, k := range keys {
		if err := memberlist.ValidateKey(k); err != nil {
			return fmt.Errorf("gossip: set keys: %w", err)
		}
	}
	// Add before use before remove: a message is never refused that
	// either the old or the new set accepts.
	for _, k := range keys {
		if err := g.keyring.AddKey(k); err != nil {
			return fmt.Errorf("gossip: set keys: %w", err)
		}
	}
	if err := g.keyring.UseKey(keys[0]); err != nil {
		return fmt.Errorf("gossip: set keys: %w", err)
	}
	// GetKeys returns the ring's own slice, which RemoveKey shifts in
	// place: range over a copy, or keys are skipped.
	for _, old := range slices.Clone(g.keyring.GetKeys()) {
		if !slices.ContainsFunc(keys, func(k []byte) bool { return bytes.Equal(k, old) }) {
			if err := g.keyring.RemoveKey(old); err != nil {
				return fmt.Errorf("gossip: set keys: %w", err)
			}
		}
	}
	return nil
}

// Encrypted reports whether gossip is encrypted.
func (g *Gossip) Encrypted() bool { return g.keyring != nil }

// Join contacts the given host:port addresses, a few at a time, and
// merges their view of the cluster. Addresses equal to LocalAddr are
// skipped; joining no other address is not an error. It returns the
// number of addresses that answered, and an error when none did. It
// returns early when ctx is done; the exchanges already started then end
// on their own within TCPTimeout.
func (g *Gossip) Join(ctx context.Context, addrs []string) (int, error) {
	select {
	case <-g.done:
		return 0, fmt.Errorf("gossip: join: %w", ErrClosed)
	default:
	}
	var todo []string
	for _, a := range addrs {
		if ap, err := netip.ParseAddrPort(a); err == nil && ap.Addr().Unmap() == g.localAddr.Addr() && ap.Port() == g.localAddr.Port() {
			continue
		}
		if !slices.Contains(todo, a) {
			todo = append(todo, a)
		}
	}
	if len(todo) == 0 {
		return 0, nil
	}

	type result struct {
		n   int
		err error
	}
	// Buffered so that attempts abandoned on ctx.Done do not leak.
	results := make(chan result, len(todo))
	sem := make(chan struct{}, joinParallelism)
	for _, a := range todo {
		go func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				results <- result{err: fmt.Errorf("%s: %w", a, ctx.Err())}
				return
			}
			defer func() { <-sem }()
			n, err := g.ml.Join([]string{a})
			if err != nil {
				err = fmt.Errorf("%s: %w", a, err)
			}
			results <- result{n: n, err: err}
		}()
	}

	var (
		joined int
		errs   []error
	)
	for range todo {
		select {
		case r := <-results:
			joined += r.n
			if r.err != nil {
				errs = append(errs, r.err)
			}
		case <-ctx.Done():
			if joined > 0 {
				return joined, nil
			}
			return 0, fmt.Errorf("gossip: join: %w", errors.Join(append([]error{ctx.Err()}, errs...)...))
		}
	}
	if joined > 0 {
		return joined, nil
	}
	return 0, fmt.Errorf("gossip: join: no address answered: %w", errors.Join(errs...))
}

// Run blocks until ctx is done, then shuts down without leaving and
// returns ctx's error; it returns nil at once when Shutdown or Leave was
// called. It suits an errgroup.
func (g *Gossip) Run(ctx context.Context) error {
	select {
	case <-ctx.Done():
		if err := g.Shutdown(); err != nil {
			return err
		}
		return ctx.Err()
	case <-g.done:
		return nil
	}
}

// Leave tells the cluster that this host is gone for good, so that the
// others drop it at once instead of after failure detection, then shuts
// down. It blocks until the leave message was sent to another member, or
// ctx is done or LeaveTimeout passed; it shuts down in every case.
// Leave is for removing a host; a restarting overlayd calls Shutdown.
func (g *Gossip) Leave(ctx context.Context) error {
	g.lifeMu.Lock()
	defer g.lifeMu.Unlock()
	if g.closed {
		return fmt.Errorf("gossip: leave: %w", ErrClosed)
	}
	// memberlist's Leave is not ctx-aware and waits forever with no
	// timeout: bound it by ctx's deadline and skip it when ctx is done.
	timeout := g.leaveTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d))
	}
	var errs []error
	if err := ctx.Err(); err != nil {
		errs = append(errs, fmt.Errorf("gossip: leave: %w", err))
	} else if timeout <= 0 {
		errs = append(errs, fmt.Errorf("gossip: leave: %w", context.DeadlineExceeded))
	} else if err := g.ml.Leave(timeout); err != nil {
		errs = append(errs, fmt.Errorf("gossip: leave: %w", err))
	}
	if err := g.shutdownLocked(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Shutdown stops gossiping without leaving: the others see this host fail
// and drop it after failure detection, unless it comes back first. It
// waits for a running OnChange call to return; no call starts after it.
// It is safe to call more than once; it must not be called from OnChange.
func (g *Gossip) Shutdown() error {
	g.lifeMu.Lock()
	defer g.lifeMu.Unlock()
	return g.shutdownLocked()
}

func (g *Gossip) shutdownLocked() error {
	if g.closed {
		return nil
	}
	g.closed = true
	err := g.ml.Shutdown()
	close(g.done)
	<-g.notifyDone
	if err != nil {
		return fmt.Errorf("gossip: shutdown: %w", err)
	}
	g.log.Info("gossip stopped")
	return nil
}

// notifyLoop calls OnChange after each kick until Shutdown.
func (g *Gossip) notifyLoop() {
	defer close(g.notifyDone)
	for {
		select {
		case <-g.kick:
			if g.onChange != nil {
				g.onChange()
			}
		case <-g.done:
			return
		}
	}
}

// kickChange asks for an OnChange call without blocking.
func (g *Gossip) kickChange() {
	select {
	case g.kick <- struct{}{}:
	default:
	}
}

// update records the metadata of another node that joined or changed.
// It runs from memberlist's event callbacks, which hold memberlist's node
// lock: it must not block nor call memberlist.
func (g *Gossip) update(n *memberlist.Node, joined bool) {
	if n.Name == string(g.host) {
		return
	}
	m, err := decodeMeta(n.Meta)
	if err == nil && string(m.Host) != n.Name {
		err = fmt.Errorf("%w: host ID %q differs from node name", errBadMeta, m.Host)
	}
	addr := net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))

	g.mu.Lock()
	delete(g.departed, n.Name)
	delete(g.suspects, n.Name)
	old, had := g.nodes[n.Name]
	if err != nil {
		repeated := had && old.err != nil && string(old.raw) == string(n.Meta)
		g.nodes[n.Name] = node{err: err, raw: slices.Clone(n.Meta)}
		g.mu.Unlock()
		if !repeated {
			g.rejectedMetas.Add(1)
			g.log.Warn("ignoring member with invalid metadata", "node", n.Name, "addr", addr, "err", err)
		}
	} else {
		g.nodes[n.Name] = node{member: m}
		g.mu.Unlock()
		if joined {
			g.log.Info("member joined", "member", m.Host, "addr", addr, "underlay", m.Underlay)
		} else {
			g.log.Debug("member updated", "member", m.Host, "addr", addr, "underlay", m.Underlay)
		}
	}
	g.kickChange()
}

// remove forgets a node that left or failed. Like update, it must not
// block nor call memberlist.
func (g *Gossip) remove(n *memberlist.Node) {
	if n.Name == string(g.host) {
		return
	}
	g.mu.Lock()
	delete(g.nodes, n.Name)
	delete(g.suspects, n.Name)
	g.departed[n.Name] = true
	g.mu.Unlock()
	// n.State cannot tell a leave from a failure: memberlist keeps the
	// state outside the Node it passes.
	g.log.Info("member left or failed", "node", n.Name)
	g.kickChange()
}

// events is the memberlist.EventDelegate of a Gossip. memberlist calls it
// from several goroutines but never concurrently, holding its node lock.
type events struct{ g *Gossip }

func (e events) NotifyJoin(n *memberlist.Node)   { e.g.update(n, true) }
func (e events) NotifyUpdate(n *memberlist.Node) { e.g.update(n, false) }
func (e events) NotifyLeave(n *memberlist.Node)  { e.g.remove(n) }

// delegate is the memberlist.Delegate of a Gossip: it supplies the local
// metadata and nothing else. memberlist calls it concurrently, sometimes
// holding its node lock.
type delegate struct{ g *Gossip }

// NodeMeta returns the local metadata. New keeps it within MetaMaxSize,
// the only limit memberlist passes.
func (d delegate) NodeMeta(limit int) []byte {
	if len(d.g.meta) > limit {
		return nil
	}
	return slices.Clone(d.g.meta)
}

func (delegate) NotifyMsg([]byte)                    {}
func (delegate) GetBroadcasts(int, int) [][]byte     { return nil }
func (delegate) LocalState(bool) []byte              { return nil }
func (delegate) MergeRemoteState(buf []byte, _ bool) {}
