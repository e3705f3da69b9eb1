// Package vxlan is the Linux dataplane of an overlay network: routed
// (layer 3) VXLAN in the manner of flannel's vxlan backend, but declarative.
//
// On each host a network has two devices. A bridge holds the gateway
// address of every local block and the host ends of the containers' veths.
// A VXLAN device, not enslaved to the bridge, carries the traffic to the
// other hosts: for every peer it has a static FDB entry and a permanent
// neighbour entry for the peer's VTEP, and a route per peer block via the
// peer's underlay address. The host routes between the two devices.
//
// Linux.Set converges the kernel to a configuration, removing what is
// stale, so it may be called again and again with the same configuration.
package vxlan

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/overlaynet/overlay/overlay"
)

// Overhead is how many bytes VXLAN over IPv4 adds to every packet: the
// outer IPv4 header (20), UDP header (8), VXLAN header (8) and the inner
// Ethernet header (14). Callers set the overlay MTU to the underlay MTU
// minus Overhead.
const Overhead = 50

// RouteProtocol is the protocol number (rtm_protocol, "proto" in ip-route)
// of the routes Set installs. Set removes stale routes on the VXLAN device
// only when they carry it, so routes added by others are left alone. It
// is not one of the numbers listed in iproute2's rt_protos.
const RouteProtocol netlink.RouteProtocol = 111

// Underlay describes the host's underlay: where VXLAN packets leave.
type Underlay struct {
	// Addr is the local underlay IPv4 address.
	Addr netip.Addr
	// Link is the name of the interface that holds Addr.
	Link string
	// MTU is the MTU of Link.
	MTU int
}

// Linux is the overlay.Dataplane of a Linux network namespace, programmed
// through one netlink handle. It is safe for concurrent use: calls are
// serialized and block while they talk to the kernel.
type Linux struct {
	h     *netlink.Handle
	neigh *NeighSocket // or nil: FDB and neighbour entries are listed through h
	log   *slog.Logger

	now func() time.Time

	mu sync.Mutex // serializes the kernel work of Set, Delete and Text; guards ports
	// ports is what the last scan of each bridge's ports found, by bridge
	// name (see bridgeMTULocked).
	ports map[string]portScan

	statsMu sync.Mutex // guards stats; never held while talking to the kernel
	stats   Stats
}

// Stats are what a Linux dataplane programmed, by kind of entry: "fdb",
// "neighbour", "route" (on the VXLAN device) and "gateway" (the bridge's
// addresses).
type Stats struct {
	// Entries counts the entries the last Set left on the devices: those
	// it wanted, less those it failed to add.
	Entries map[string]int
	// Added and Deleted count the entries added and deleted since New.
	Added, Deleted map[string]uint64
}

// Stats returns what the dataplane programmed. It does not wait for a Set
// in progress. The maps are the caller's.
func (l *Linux) Stats() Stats {
	l.statsMu.Lock()
	defer l.statsMu.Unlock()
	return Stats{Entries: maps.Clone(l.stats.Entries), Added: maps.Clone(l.stats.Added), Deleted: maps.Clone(l.stats.Deleted)}
}

// record counts, for kind, the entries now on the device and the changes
// made.
func (l *Linux) record(kind string, entries, added, deleted int) {
	l.statsMu.Lock()
	defer l.statsMu.Unlock()
	l.stats.Entries[kind] = entries
	l.stats.Added[kind] += uint64(added)
	l.stats.Deleted[kind] += uint64(deleted)
}

// forget counts no entries of any kind: the devices are gone.
func (l *Linux) forget() {
	l.statsMu.Lock()
	defer l.statsMu.Unlock()
	clear(l.stats.Entries)
}

// portScan is what a scan of a bridge's ports found: the MTU the bridge
// needs, for which network MTU, and when.
type portScan struct {
	want, lowest int
	at           time.Time
}

// PortScanInterval is how often the ports of a bridge that is at its
// network's MTU are listed, to find one whose MTU was lowered by hand.
// They are listed on every pass while the bridge is held below the
// network's MTU, and when the network's MTU changes: only those make a
// port with a lower MTU than the network's (the plugin gives every new
// one the network's).
const PortScanInterval = time.Minute

var _ overlay.Dataplane = (*Linux)(nil)

// New returns a dataplane that programs the network namespace of h, which
// must not be nil and stays owned by the caller. neigh, when not nil, is a
// NeighSocket on the same namespace, also the caller's, through which the
// VXLAN device's FDB and neighbour entries are listed: the kernel then
// sends only that device's, where h gets, and decodes, the FDB entries of
// every bridge port of the namespace (every container's) and every
// neighbour on every pass. A nil log discards the logs.
func New(h *netlink.Handle, neigh *NeighSocket, log *slog.Logger) *Linux {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Linux{h: h, neigh: neigh, log: log, now: time.Now, ports: make(map[string]portScan), stats: Stats{
		Entries: make(map[string]int), Added: make(map[string]uint64), Deleted: make(map[string]uint64),
	}}
}

// mac is a comparable Ethernet address.
type mac [6]byte

func (m mac) String() string { return net.HardwareAddr(m[:]).String() }

// hw returns m as a net.HardwareAddr.
func (m mac) hw() net.HardwareAddr { return net.HardwareAddr(m[:]) }

// fdbEntry is a static FDB entry of the VXLAN device: frames to MAC are
// encapsulated to Dst.
type fdbEntry struct {
	MAC mac
	Dst netip.Addr
}

// neighEntry is a permanent neighbour entry of the VXLAN device.
type neighEntry struct {
	IP  netip.Addr
	MAC mac
}

// routeEntry is an IPv4 route of the main table on the VXLAN device.
type routeEntry struct {
	Dst    netip.Prefix
	Gw     netip.Addr
	Src    netip.Addr // invalid when the route has no preferred source
	OnLink bool
	Proto  netlink.RouteProtocol
	Metric int
}

// routeKey identifies a route in the kernel's main table (the TOS is
// always 0 here).
type routeKey struct {
	Dst    netip.Prefix
	Metric int
}

func (r routeEntry) key() routeKey { return routeKey{r.Dst, r.Metric} }

// state is the part of a network's dataplane that Set manages, in a form
// that can be diffed and rendered.
type state struct {
	Gateways []netip.Prefix // addresses of the bridge inside the network
	FDB      []fdbEntry
	Neighs   []neighEntry
	Routes   []routeEntry
}

// desired returns the state cfg asks for. Local blocks and peers that are
// invalid are left out and reported in the joined error; the rest of the
// state is still returned.
func desired(cfg overlay.DataplaneConfig) (state, error) {
	var (
		s    state
		errs []error
		n    = cfg.Network
	)
	var src netip.Addr
	for _, b := range cfg.Blocks {
		if n.BlockIndex(b) < 0 {
			errs = append(errs, fmt.Errorf("vxlan: local block %s is not a block of network %s (%s/%d)", b, n.Name, n.CIDR, n.BlockBits))
			continue
		}
		gw := netip.PrefixFrom(overlay.Gateway(b), b.Bits())
		if !src.IsValid() {
			src = gw.Addr()
		}
		s.Gateways = append(s.Gateways, gw)
	}

	neighs := make(map[netip.Addr]mac)
	routes := make(map[netip.Prefix]overlay.HostID)
	for _, p := range cfg.Peers {
		if !p.Underlay.Is4() {
			errs = append(errs, fmt.Errorf("vxlan: peer %s: underlay address %q is not IPv4", p.Host, p.Underlay))
			continue
		}
		if len(p.VTEPMAC) != len(mac{}) {
			errs = append(errs, fmt.Errorf("vxlan: peer %s: VTEP MAC %q is not a 6-byte Ethernet address", p.Host, p.VTEPMAC))
			continue
		}
		m := mac(p.VTEPMAC)
		if old, ok := neighs[p.Underlay]; ok {
			if old != m {
				errs = append(errs, fmt.Errorf("vxlan: peer %s: underlay address %s is already used by another peer with VTEP MAC %s", p.Host, p.Underlay, old))
				continue
			}
		} else {
			neighs[p.Underlay] = m
			s.FDB = append(s.FDB, fdbEntry{MAC: m, Dst: p.Underlay})
			s.Neighs = append(s.Neighs, neighEntry{IP: p.Underlay, MAC: m})
		}
		for _, b := range p.Blocks {
			if n.BlockIndex(b) < 0 {
				errs = append(errs, fmt.Errorf("vxlan: peer %s: block %s is not a block of network %s (%s/%d)", p.Host, b, n.Name, n.CIDR, n.BlockBits))
				continue
			}
			if owner, ok := routes[b]; ok {
				errs = append(errs, fmt.Errorf("vxlan: peer %s: block %s is already routed to peer %s", p.Host, b, owner))
				continue
			}
			routes[b] = p.Host
			s.Routes = append(s.Routes, routeEntry{
				Dst:    b,
				Gw:     p.Underlay,
				Src:    src,
				OnLink: true,
				Proto:  RouteProtocol,
			})
		}
	}
	return s, errors.Join(errs...)
}

// text renders s in the format of overlaytest.ConfigText: sorted lines,
// one per gateway, FDB entry, neighbour and route.
func (s state) text() string {
	var lines []string
	for _, g := range s.Gateways {
		lines = append(lines, fmt.Sprintf("gateway %s", g))
	}
	for _, f := range s.FDB {
		lines = append(lines, fmt.Sprintf("fdb %s dst %s", f.MAC, f.Dst))
	}
	for _, n := range s.Neighs {
		lines = append(lines, fmt.Sprintf("neigh %s lladdr %s", n.IP, n.MAC))
	}
	for _, r := range s.Routes {
		if r.Gw.IsValid() {
			lines = append(lines, fmt.Sprintf("route %s via %s", r.Dst, r.Gw))
		} else {
			lines = append(lines, fmt.Sprintf("route %s", r.Dst))
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// diff compares the entries wanted with those the kernel has. add are the
// wanted entries the kernel lacks or holds with other values (to be added
// or replaced); del are the entries the kernel has whose key is not
// wanted at all (to be deleted). An entry that is replaced is never
// deleted, so adding before deleting never removes what was just added.
func diff[E comparable, K comparable](want, have []E, key func(E) K) (add, del []E) {
	haveSet := make(map[E]bool, len(have))
	for _, e := range have {
		haveSet[e] = true
	}
	wantKeys := make(map[K]bool, len(want))
	for _, e := range want {
		wantKeys[key(e)] = true
		if !haveSet[e] {
			add = append(add, e)
		}
	}
	for _, e := range have {
		if !wantKeys[key(e)] {
			del = append(del, e)
		}
	}
	return add, del
}

// identity is the key of entries whose every field identifies them.
func identity[E any](e E) E { return e }

func (f fdbEntry) String() string   { return fmt.Sprintf("%s dst %s", f.MAC, f.Dst) }
func (n neighEntry) String() string { return fmt.Sprintf("%s lladdr %s", n.IP, n.MAC) }

// String renders the route in ip-route's words.
func (r routeEntry) String() string {
	s := r.Dst.String()
	if r.Gw.IsValid() {
		s += " via " + r.Gw.String()
	}
	if r.Src.IsValid() {
		s += " src " + r.Src.String()
	}
	if r.OnLink {
		s += " onlink"
	}
	s += fmt.Sprintf(" proto %d", r.Proto)
	if r.Metric != 0 {
		s += fmt.Sprintf(" metric %d", r.Metric)
	}
	return s
}

// differences lists how have differs from want, entry by entry: an entry
// whose key both hold with other values is one difference, not two.
func differences(want, have state) []overlay.Difference {
	var out []overlay.Difference
	out = append(out, differ("gateway", want.Gateways, have.Gateways, identity[netip.Prefix], netip.Prefix.String)...)
	out = append(out, differ("fdb", want.FDB, have.FDB, func(e fdbEntry) mac { return e.MAC }, fdbEntry.String)...)
	out = append(out, differ("neighbour", want.Neighs, have.Neighs, func(e neighEntry) netip.Addr { return e.IP }, neighEntry.String)...)
	// Routes of other protocols on the device are someone else's, as in
	// Set: not stale.
	routes := slices.DeleteFunc(slices.Clone(have.Routes), func(r routeEntry) bool {
		return r.Proto != RouteProtocol && !slices.ContainsFunc(want.Routes, func(w routeEntry) bool { return w.key() == r.key() })
	})
	out = append(out, differ("route", want.Routes, routes, routeEntry.key, routeEntry.String)...)
	return out
}

func differ[E comparable, K comparable](kind string, want, have []E, key func(E) K, str func(E) string) []overlay.Difference {
	add, del := diff(want, have, key)
	haveByKey := make(map[K]E, len(have))
	for _, e := range have {
		haveByKey[key(e)] = e
	}
	var out []overlay.Difference
	for _, e := range add {
		d := overlay.Difference{Kind: kind, Want: str(e)}
		if h, ok := haveByKey[key(e)]; ok {
			d.Have = str(h)
		}
		out = append(out, d)
	}
	for _, e := range del {
		out = append(out, overlay.Difference{Kind: kind, Have: str(e)})
	}
	return out
}
