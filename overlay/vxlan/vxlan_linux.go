package vxlan

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/overlaynet/overlay/overlay"
)

// dumpAttempts is how many times a netlink dump interrupted by a
// concurrent change is tried before its partial result is used.
const dumpAttempts = 5

// Set converges the network's devices and entries to cfg. See
// overlay.Dataplane. A configuration that cannot be programmed at all (an
// invalid network, underlay address or VTEP MAC) fails before anything is
// changed; an invalid peer or block is left out and reported while the
// rest is programmed. An MTU of 0 leaves the devices' MTU alone.
func (l *Linux) Set(ctx context.Context, cfg overlay.DataplaneConfig) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("vxlan: set network %s: %w", cfg.Network.Name, err)
	}
	if err := cfg.Network.Validate(); err != nil {
		return fmt.Errorf("vxlan: set network %s: %w", cfg.Network.Name, err)
	}
	if !cfg.Underlay.Is4() {
		return fmt.Errorf("vxlan: set network %s: underlay address %q is not IPv4", cfg.Network.Name, cfg.Underlay)
	}
	if len(cfg.VTEPMAC) != len(mac{}) {
		return fmt.Errorf("vxlan: set network %s: VTEP MAC %q is not a 6-byte Ethernet address", cfg.Network.Name, cfg.VTEPMAC)
	}
	if cfg.BridgeMAC != nil && len(cfg.BridgeMAC) != len(mac{}) {
		return fmt.Errorf("vxlan: set network %s: bridge MAC %q is not a 6-byte Ethernet address", cfg.Network.Name, cfg.BridgeMAC)
	}
	if cfg.MTU < 0 {
		return fmt.Errorf("vxlan: set network %s: negative MTU %d", cfg.Network.Name, cfg.MTU)
	}
	want, err := desired(cfg)
	errs := []error{err}

	l.mu.Lock()
	defer l.mu.Unlock()

	// The bridge comes first: the routes' preferred source is one of its
	// gateway addresses, which the kernel requires to be local.
	br, err := l.ensureBridgeLocked(cfg)
	if err != nil {
		errs = append(errs, err)
	} else {
		errs = append(errs, l.syncGatewaysLocked(br, cfg.Network.CIDR, want.Gateways)...)
	}
	if err := ctx.Err(); err != nil {
		return errors.Join(append(errs, fmt.Errorf("vxlan: set network %s: %w", cfg.Network.Name, err))...)
	}
	vx, err := l.ensureVXLANLocked(cfg)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	errs = append(errs, l.syncFDBLocked(vx, want.FDB)...)
	errs = append(errs, l.syncNeighsLocked(vx, want.Neighs)...)
	errs = append(errs, l.syncRoutesLocked(vx, want.Routes)...)
	return errors.Join(errs...)
}

// Delete removes the network's VXLAN device and bridge, and with them
// every entry on them. Devices that do not exist are not an error.
func (l *Linux) Delete(ctx context.Context, n overlay.Network) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("vxlan: delete network %s: %w", n.Name, err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.ports, n.BridgeName())
	l.forget()
	return errors.Join(
		l.deleteLinkLocked(n.VXLANName()),
		l.deleteLinkLocked(n.BridgeName()),
	)
}

// Text reads the network's state back from the kernel and renders it in
// the format of overlaytest.ConfigText, so that tests can compare it with
// the configuration that was set. It renders the bridge's addresses inside
// the network's CIDR, the permanent FDB and neighbour entries of the VXLAN
// device and every IPv4 route of the main table on it. It fails, wrapping
// overlay.ErrNotFound, when a device is missing.
func (l *Linux) Text(n overlay.Network) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()

	var errs []error
	var s state
	br, err := l.linkLocked(n.BridgeName())
	if err != nil {
		errs = append(errs, err)
	} else {
		s.Gateways, err = l.listGatewaysLocked(br, n.CIDR)
		errs = append(errs, err)
	}
	vx, err := l.linkLocked(n.VXLANName())
	if err != nil {
		errs = append(errs, err)
	} else {
		s.FDB, err = l.listFDBLocked(vx)
		errs = append(errs, err)
		s.Neighs, err = l.listNeighsLocked(vx)
		errs = append(errs, err)
		s.Routes, err = l.listRoutesLocked(vx)
		errs = append(errs, err)
	}
	return s.text(), errors.Join(errs...)
}

// Check reads the network's dataplane back from the kernel and returns
// how it differs from cfg: a device missing, down, of another kind, VNI,
// port or MTU, and every gateway address, FDB, neighbour and route entry
// missing, different or stale (what Set would change). It changes
// nothing.
func (l *Linux) Check(ctx context.Context, cfg overlay.DataplaneConfig) ([]overlay.Difference, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("vxlan: check network %s: %w", cfg.Network.Name, err)
	}
	want, err := desired(cfg)
	errs := []error{err}
	// Set holds the lock for a whole pass, which nothing bounds: a
	// check waits for it only as long as ctx allows.
	for !l.mu.TryLock() {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("vxlan: check network %s: waiting for the pass in progress: %w", cfg.Network.Name, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
	defer l.mu.Unlock()
	var have state
	var out []overlay.Difference
	device := func(name, have, want string) {
		out = append(out, overlay.Difference{Kind: "device", Want: name + " " + want, Have: name + " " + have})
	}
	br, err := l.h.LinkByName(cfg.Network.BridgeName())
	switch {
	case isLinkNotFound(err):
		out = append(out, overlay.Difference{Kind: "device", Want: cfg.Network.BridgeName() + " (bridge)"})
	case err != nil:
		errs = append(errs, fmt.Errorf("vxlan: get device %s: %w", cfg.Network.BridgeName(), err))
	default:
		if br.Type() != "bridge" {
			device(br.Attrs().Name, "type "+br.Type(), "type bridge")
		}
		if br.Attrs().Flags&net.FlagUp == 0 {
			device(br.Attrs().Name, "down", "up")
		}
		have.Gateways, err = l.listGatewaysLocked(br, cfg.Network.CIDR)
		errs = append(errs, err)
	}
	vx, err := l.h.LinkByName(cfg.Network.VXLANName())
	switch {
	case isLinkNotFound(err):
		out = append(out, overlay.Difference{Kind: "device", Want: cfg.Network.VXLANName() + " (vxlan)"})
	case err != nil:
		errs = append(errs, fmt.Errorf("vxlan: get device %s: %w", cfg.Network.VXLANName(), err))
	default:
		wantVX := &netlink.Vxlan{VxlanId: int(cfg.Network.VNI), SrcAddr: net.IP(cfg.Underlay.AsSlice()), Port: int(cfg.Network.Port)}
		if have, ok := vx.(*netlink.Vxlan); ok {
			wantVX.VtepDevIndex = have.VtepDevIndex // the underlay link is looked up by Set
		}
		if why := vxlanMismatch(vx, wantVX); why != "" {
			device(vx.Attrs().Name, why, "as configured (overlayd recreates it)")
		}
		if cfg.MTU > 0 && vx.Attrs().MTU != cfg.MTU {
			device(vx.Attrs().Name, fmt.Sprintf("MTU %d", vx.Attrs().MTU), fmt.Sprintf("MTU %d", cfg.MTU))
		}
		if vx.Attrs().Flags&net.FlagUp == 0 {
			device(vx.Attrs().Name, "down", "up")
		}
		have.FDB, err = l.listFDBLocked(vx)
		errs = append(errs, err)
		have.Neighs, err = l.listNeighsLocked(vx)
		errs = append(errs, err)
		have.Routes, err = l.listRoutesLocked(vx)
		errs = append(errs, err)
	}
	if vx == nil || br == nil {
		// Entries on a device that is missing are all missing; say so
		// once, by the device.
		return out, errors.Join(errs...)
	}
	return append(out, differences(want, have)...), errors.Join(errs...)
}

// linkLocked returns the device name, wrapping overlay.ErrNotFound when
// it does not exist.
func (l *Linux) linkLocked(name string) (netlink.Link, error) {
	link, err := l.h.LinkByName(name)
	if isLinkNotFound(err) {
		return nil, fmt.Errorf("vxlan: device %s: %w", name, overlay.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("vxlan: get device %s: %w", name, err)
	}
	return link, nil
}

// deleteLinkLocked deletes the device name if it exists.
func (l *Linux) deleteLinkLocked(name string) error {
	link, err := l.h.LinkByName(name)
	if isLinkNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vxlan: get device %s: %w", name, err)
	}
	if err := l.h.LinkDel(link); err != nil && !isGone(err) {
		return fmt.Errorf("vxlan: delete device %s: %w", name, err)
	}
	l.log.Info("deleted device", "device", name)
	return nil
}

// ensureBridgeLocked creates the network's bridge or converges its MAC
// address, MTU and state, and returns it. The MAC address is set, never
// left to the kernel: a bridge without one takes the lowest MAC address
// of its ports, so a container's ADD or DEL would change the gateway's
// address under every other container. The MTU is cfg.MTU, or lower while
// a port has a lower one (see bridgeMTULocked).
func (l *Linux) ensureBridgeLocked(cfg overlay.DataplaneConfig) (netlink.Link, error) {
	name := cfg.Network.BridgeName()
	want := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: cfg.MTU, HardwareAddr: cfg.BridgeMAC}}
	link, err := l.h.LinkByName(name)
	switch {
	case isLinkNotFound(err):
		link, err = l.createLinkLocked(want)
	case err != nil:
		return nil, fmt.Errorf("vxlan: get device %s: %w", name, err)
	case link.Type() != want.Type():
		l.log.Warn("recreating device", "device", name, "reason", "type "+link.Type())
		if err := l.h.LinkDel(link); err != nil && !isGone(err) {
			return nil, fmt.Errorf("vxlan: delete device %s of type %s: %w", name, link.Type(), err)
		}
		link, err = l.createLinkLocked(want)
	}
	if err != nil {
		return nil, err
	}
	mtu, err := l.bridgeMTULocked(link, cfg.MTU)
	return link, errors.Join(err, l.convergeLinkLocked(link, mtu, cfg.BridgeMAC))
}

// bridgeMTULocked returns the MTU the bridge br should have: want, or the
// lowest MTU of its ports when that is lower. A container keeps the MTU it
// was created with; after the network's MTU was raised (the underlay's
// went up and overlayd restarted), the bridge stays at the MTU of the
// oldest containers until they are gone, so that a packet routed to one of
// them that is too large for it gets an ICMP error from the host instead
// of being dropped silently by its veth. It logs when that starts and
// ends. An MTU of 0, or ports that cannot be listed, give 0: the bridge's
// MTU is left as it is.
//
// Listing the ports means listing every link of the namespace (netlink
// cannot list one bridge's), which costs a pass O(containers on the
// host): so the ports are listed only while the bridge is held, when want
// changed, and every PortScanInterval.
func (l *Linux) bridgeMTULocked(br netlink.Link, want int) (int, error) {
	if want <= 0 {
		return 0, nil
	}
	name := br.Attrs().Name
	last, ok := l.ports[name]
	if ok && last.want == want && last.lowest == want && l.now().Sub(last.at) < PortScanInterval {
		return want, nil
	}
	links, err := retryDump(l.h.LinkList)
	if err != nil {
		return 0, fmt.Errorf("vxlan: list the ports of %s: %w", br.Attrs().Name, err)
	}
	lowest, below := want, 0
	for _, p := range links {
		if a := p.Attrs(); a.MasterIndex == br.Attrs().Index && a.MTU > 0 && a.MTU < want {
			lowest = min(lowest, a.MTU)
			below++
		}
	}
	if last.lowest != lowest {
		switch {
		case lowest < want:
			l.log.Warn("holding the bridge at the MTU of containers created before the MTU was raised; recreate them to use the new MTU",
				"device", name, "mtu", lowest, "network-mtu", want, "containers", below)
		case last.lowest != 0:
			l.log.Info("bridge back at the network's MTU: no container with a lower MTU is left", "device", name, "mtu", want)
		}
	}
	l.ports[name] = portScan{want: want, lowest: lowest, at: l.now()}
	return lowest, nil
}

// ensureVXLANLocked creates the network's VXLAN device, recreates it when
// attributes that cannot change differ, converges its MTU, address and
// state, and returns it.
func (l *Linux) ensureVXLANLocked(cfg overlay.DataplaneConfig) (netlink.Link, error) {
	name := cfg.Network.VXLANName()
	want := &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{Name: name, MTU: cfg.MTU, HardwareAddr: cfg.VTEPMAC},
		VxlanId:   int(cfg.Network.VNI),
		SrcAddr:   net.IP(cfg.Underlay.AsSlice()),
		Port:      int(cfg.Network.Port),
		Learning:  false,
	}
	if cfg.UnderlayLink != "" {
		ul, err := l.h.LinkByName(cfg.UnderlayLink)
		if err != nil {
			return nil, fmt.Errorf("vxlan: underlay link %s of device %s: %w", cfg.UnderlayLink, name, err)
		}
		want.VtepDevIndex = ul.Attrs().Index
	}

	link, err := l.h.LinkByName(name)
	switch {
	case isLinkNotFound(err):
		link, err = l.createLinkLocked(want)
	case err != nil:
		return nil, fmt.Errorf("vxlan: get device %s: %w", name, err)
	default:
		if why := vxlanMismatch(link, want); why != "" {
			l.log.Info("recreating device", "device", name, "reason", why)
			if err := l.h.LinkDel(link); err != nil && !isGone(err) {
				return nil, fmt.Errorf("vxlan: delete device %s to recreate it (%s): %w", name, why, err)
			}
			link, err = l.createLinkLocked(want)
		}
	}
	if err != nil {
		return nil, err
	}
	return link, l.convergeLinkLocked(link, cfg.MTU, cfg.VTEPMAC)
}

// vxlanMismatch returns why link cannot serve as want, or "" when it can.
// These attributes are fixed when a device is created.
func vxlanMismatch(link netlink.Link, want *netlink.Vxlan) string {
	have, ok := link.(*netlink.Vxlan)
	switch {
	case !ok:
		return "type " + link.Type()
	case have.VxlanId != want.VxlanId:
		return fmt.Sprintf("VNI %d, want %d", have.VxlanId, want.VxlanId)
	case have.Port != want.Port:
		return fmt.Sprintf("port %d, want %d", have.Port, want.Port)
	case !have.SrcAddr.Equal(want.SrcAddr):
		return fmt.Sprintf("local address %s, want %s", have.SrcAddr, want.SrcAddr)
	case have.VtepDevIndex != want.VtepDevIndex:
		return fmt.Sprintf("underlay link index %d, want %d", have.VtepDevIndex, want.VtepDevIndex)
	case have.Learning != want.Learning:
		return fmt.Sprintf("learning %t, want %t", have.Learning, want.Learning)
	}
	return ""
}

// createLinkLocked adds link and returns it as the kernel reports it.
func (l *Linux) createLinkLocked(link netlink.Link) (netlink.Link, error) {
	name := link.Attrs().Name
	if err := l.h.LinkAdd(link); err != nil {
		return nil, fmt.Errorf("vxlan: create %s device %s: %w", link.Type(), name, err)
	}
	l.log.Info("created device", "device", name, "type", link.Type())
	got, err := l.h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("vxlan: get device %s after creating it: %w", name, err)
	}
	return got, nil
}

// convergeLinkLocked sets the MTU (unless 0) and the hardware address
// (unless nil) of link when they differ, and brings it up.
func (l *Linux) convergeLinkLocked(link netlink.Link, mtu int, hw net.HardwareAddr) error {
	a := link.Attrs()
	var errs []error
	if mtu > 0 && a.MTU != mtu {
		if err := l.h.LinkSetMTU(link, mtu); err != nil {
			errs = append(errs, fmt.Errorf("vxlan: set MTU of %s to %d: %w", a.Name, mtu, err))
		} else {
			l.log.Info("set MTU", "device", a.Name, "mtu", mtu, "was", a.MTU)
		}
	}
	if hw != nil && !bytes.Equal(a.HardwareAddr, hw) {
		if err := l.h.LinkSetHardwareAddr(link, hw); err != nil {
			errs = append(errs, fmt.Errorf("vxlan: set address of %s to %s: %w", a.Name, hw, err))
		} else {
			l.log.Info("set hardware address", "device", a.Name, "addr", hw.String(), "was", a.HardwareAddr.String())
		}
	}
	if a.Flags&net.FlagUp == 0 {
		if err := l.h.LinkSetUp(link); err != nil {
			errs = append(errs, fmt.Errorf("vxlan: set %s up: %w", a.Name, err))
		}
	}
	return errors.Join(errs...)
}

// syncGatewaysLocked adds the wanted gateway addresses to the bridge and
// removes its other addresses inside cidr.
func (l *Linux) syncGatewaysLocked(br netlink.Link, cidr netip.Prefix, want []netip.Prefix) []error {
	have, err := l.listGatewaysLocked(br, cidr)
	errs := []error{err}
	add, del := diff(want, have, identity)
	name := br.Attrs().Name
	added, deleted := 0, 0
	for _, p := range add {
		if err := l.h.AddrReplace(br, &netlink.Addr{IPNet: ipNet(p)}); err != nil {
			errs = append(errs, fmt.Errorf("vxlan: add address %s to %s: %w", p, name, err))
			continue
		}
		added++
		l.log.Info("added gateway", "device", name, "addr", p)
	}
	for _, p := range del {
		if err := l.h.AddrDel(br, &netlink.Addr{IPNet: ipNet(p)}); err != nil {
			if !isGone(err) {
				errs = append(errs, fmt.Errorf("vxlan: delete stale address %s from %s: %w", p, name, err))
			}
			continue
		}
		deleted++
		l.log.Info("deleted stale gateway", "device", name, "addr", p)
	}
	l.record("gateway", len(want)-(len(add)-added), added, deleted)
	return errs
}

// listGatewaysLocked returns the IPv4 addresses of br inside cidr.
func (l *Linux) listGatewaysLocked(br netlink.Link, cidr netip.Prefix) ([]netip.Prefix, error) {
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return l.h.AddrList(br, netlink.FAMILY_V4) })
	if err != nil {
		err = fmt.Errorf("vxlan: list addresses of %s: %w", br.Attrs().Name, err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if ok && cidr.Contains(p.Addr()) {
			out = append(out, p)
		}
	}
	return out, err
}

// syncFDBLocked adds the wanted FDB entries to the VXLAN device and
// removes its other static ones.
func (l *Linux) syncFDBLocked(vx netlink.Link, want []fdbEntry) []error {
	have, err := l.listFDBLocked(vx)
	add, del := diff(want, have, identity)
	idx := vx.Attrs().Index
	return append([]error{err}, apply(l, vx.Attrs().Name, len(want), add, del, verbs[fdbEntry]{
		kind:     "FDB entry",
		metric:   "fdb",
		add:      func(e fdbEntry) error { return l.h.NeighSet(fdbNeigh(idx, e)) },
		del:      func(e fdbEntry) error { return l.h.NeighDel(fdbNeigh(idx, e)) },
		describe: func(e fdbEntry) string { return fmt.Sprintf("%s dst %s", e.MAC, e.Dst) },
	})...)
}

// listFDBLocked returns the static unicast FDB entries of the VXLAN device
// that have an IPv4 destination: those Set could have made. Entries the
// kernel makes (the all-zero default, multicast ones) are left out.
func (l *Linux) listFDBLocked(vx netlink.Link) ([]fdbEntry, error) {
	idx := vx.Attrs().Index
	neighs, err := l.dumpNeighs(unix.AF_BRIDGE, idx)
	if err != nil {
		err = fmt.Errorf("vxlan: list FDB of %s: %w", vx.Attrs().Name, err)
	}
	var out []fdbEntry
	for _, n := range neighs {
		if n.LinkIndex != idx || n.Flags&netlink.NTF_SELF == 0 || n.State&netlink.NUD_PERMANENT == 0 {
			continue
		}
		m, ok := unicastMAC(n.HardwareAddr)
		dst, ok2 := netip.AddrFromSlice(n.IP)
		if !ok || !ok2 || !dst.Unmap().Is4() {
			continue
		}
		out = append(out, fdbEntry{MAC: m, Dst: dst.Unmap()})
	}
	return out, err
}

// fdbNeigh returns the netlink form of an FDB entry of device idx.
func fdbNeigh(idx int, e fdbEntry) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    idx,
		Family:       unix.AF_BRIDGE,
		Flags:        netlink.NTF_SELF,
		State:        netlink.NUD_PERMANENT,
		HardwareAddr: e.MAC.hw(),
		IP:           net.IP(e.Dst.AsSlice()),
	}
}

// syncNeighsLocked adds the wanted neighbour entries to the VXLAN device
// and removes its other permanent ones.
func (l *Linux) syncNeighsLocked(vx netlink.Link, want []neighEntry) []error {
	have, err := l.listNeighsLocked(vx)
	add, del := diff(want, have, func(e neighEntry) netip.Addr { return e.IP })
	idx := vx.Attrs().Index
	return append([]error{err}, apply(l, vx.Attrs().Name, len(want), add, del, verbs[neighEntry]{
		kind:     "neighbour",
		metric:   "neighbour",
		add:      func(e neighEntry) error { return l.h.NeighSet(neigh(idx, e)) },
		del:      func(e neighEntry) error { return l.h.NeighDel(neigh(idx, e)) },
		describe: func(e neighEntry) string { return fmt.Sprintf("%s lladdr %s", e.IP, e.MAC) },
	})...)
}

// listNeighsLocked returns the permanent IPv4 neighbour entries of the
// VXLAN device. Entries the kernel resolved itself are left out.
func (l *Linux) listNeighsLocked(vx netlink.Link) ([]neighEntry, error) {
	idx := vx.Attrs().Index
	neighs, err := l.dumpNeighs(unix.AF_INET, idx)
	if err != nil {
		err = fmt.Errorf("vxlan: list neighbours of %s: %w", vx.Attrs().Name, err)
	}
	var out []neighEntry
	for _, n := range neighs {
		if n.LinkIndex != idx || n.State&netlink.NUD_PERMANENT == 0 {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok || len(n.HardwareAddr) != len(mac{}) {
			continue
		}
		out = append(out, neighEntry{IP: ip.Unmap(), MAC: mac(n.HardwareAddr)})
	}
	return out, err
}

// neigh returns the netlink form of a neighbour entry of device idx.
func neigh(idx int, e neighEntry) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    idx,
		Family:       unix.AF_INET,
		State:        netlink.NUD_PERMANENT,
		IP:           net.IP(e.IP.AsSlice()),
		HardwareAddr: e.MAC.hw(),
	}
}

// syncRoutesLocked adds or replaces the wanted routes on the VXLAN device
// and removes its other routes that carry RouteProtocol.
func (l *Linux) syncRoutesLocked(vx netlink.Link, want []routeEntry) []error {
	have, err := l.listRoutesLocked(vx)
	add, del := diff(want, have, routeEntry.key)
	// Routes of other protocols on the device are someone else's.
	del = slices.DeleteFunc(del, func(r routeEntry) bool { return r.Proto != RouteProtocol })
	idx := vx.Attrs().Index
	return append([]error{err}, apply(l, vx.Attrs().Name, len(want), add, del, verbs[routeEntry]{
		kind:     "route",
		metric:   "route",
		add:      func(r routeEntry) error { return l.h.RouteReplace(route(idx, r)) },
		del:      func(r routeEntry) error { return l.h.RouteDel(route(idx, r)) },
		describe: func(r routeEntry) string { return fmt.Sprintf("%s via %s", r.Dst, r.Gw) },
	})...)
}

// verbs are how apply changes one kind of entry.
type verbs[E any] struct {
	kind     string // "route", "neighbour", "FDB entry": for logs and errors
	metric   string // its kind in Stats
	add, del func(E) error
	describe func(E) string
}

// apply adds the entries of add and deletes those of del on device, logs
// and counts every change, counts the wanted entries (of which add are
// those missing) that are on the device, and returns every failure; a
// failure does not stop the rest, and deleting an entry that is already
// gone is success.
func apply[E any](l *Linux, device string, wanted int, add, del []E, v verbs[E]) []error {
	var errs []error
	added, deleted := 0, 0
	for _, e := range add {
		if err := v.add(e); err != nil {
			errs = append(errs, fmt.Errorf("vxlan: add %s %s to %s: %w", v.kind, v.describe(e), device, err))
			continue
		}
		added++
		l.log.Info("added "+v.kind, "device", device, "entry", v.describe(e))
	}
	for _, e := range del {
		if err := v.del(e); err != nil {
			if !isGone(err) {
				errs = append(errs, fmt.Errorf("vxlan: delete stale %s %s from %s: %w", v.kind, v.describe(e), device, err))
			}
			continue
		}
		deleted++
		l.log.Info("deleted stale "+v.kind, "device", device, "entry", v.describe(e))
	}
	l.record(v.metric, wanted-(len(add)-added), added, deleted)
	return errs
}

// listRoutesLocked returns the IPv4 unicast routes of the main table
// whose output device is the VXLAN device, whatever their protocol.
func (l *Linux) listRoutesLocked(vx netlink.Link) ([]routeEntry, error) {
	idx := vx.Attrs().Index
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return l.h.RouteListFiltered(netlink.FAMILY_V4,
			&netlink.Route{LinkIndex: idx, Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST},
			netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE|netlink.RT_FILTER_TYPE)
	})
	if err != nil {
		err = fmt.Errorf("vxlan: list routes of %s: %w", vx.Attrs().Name, err)
	}
	var out []routeEntry
	for _, r := range routes {
		dst, ok := prefixOf(r.Dst)
		if !ok {
			dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		}
		e := routeEntry{
			Dst:    dst,
			OnLink: r.Flags&int(netlink.FLAG_ONLINK) != 0,
			Proto:  r.Protocol,
			Metric: r.Priority,
		}
		if gw, ok := netip.AddrFromSlice(r.Gw); ok {
			e.Gw = gw.Unmap()
		}
		if src, ok := netip.AddrFromSlice(r.Src); ok {
			e.Src = src.Unmap()
		}
		out = append(out, e)
	}
	return out, err
}

// route returns the netlink form of a route on device idx.
func route(idx int, r routeEntry) *netlink.Route {
	nr := &netlink.Route{
		LinkIndex: idx,
		Family:    netlink.FAMILY_V4,
		Table:     unix.RT_TABLE_MAIN,
		Type:      unix.RTN_UNICAST,
		Scope:     netlink.SCOPE_UNIVERSE,
		Dst:       ipNet(r.Dst),
		Protocol:  r.Proto,
		Priority:  r.Metric,
	}
	if r.Gw.IsValid() {
		nr.Gw = net.IP(r.Gw.AsSlice())
	} else {
		nr.Scope = netlink.SCOPE_LINK
	}
	if r.Src.IsValid() {
		nr.Src = net.IP(r.Src.AsSlice())
	}
	if r.OnLink {
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr
}

// NeighSocket lists the FDB and neighbour entries of one device at a
// time, which the kernel then filters for it: a netlink socket with strict
// checking of dump requests on, and requests that name the device the way
// strict checking wants (an FDB dump in its header, a neighbour dump in
// an NDA_IFINDEX attribute) with nothing else set. The netlink package's
// own dumps send a header with stray padding, which only the lax parser
// accepts, and the lax parser does not filter: the kernel then sends the
// FDB entries of every bridge port of the namespace (every container's)
// and every neighbour. It is safe for concurrent use.
type NeighSocket struct {
	sh *nl.SocketHandle
}

// OpenNeighSocket opens a NeighSocket on the namespace ns (netns.None()
// for the calling thread's). It fails on kernels without strict checking
// (before 4.20); New then lists through its handle.
func OpenNeighSocket(ns netns.NsHandle) (*NeighSocket, error) {
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("vxlan: netlink socket for neighbour dumps: %w", err)
	}
	if err := unix.SetsockoptInt(s.GetFd(), unix.SOL_NETLINK, unix.NETLINK_GET_STRICT_CHK, 1); err != nil {
		s.Close()
		return nil, fmt.Errorf("vxlan: netlink strict checking: %w", err)
	}
	for _, set := range []func(*unix.Timeval) error{s.SetSendTimeout, s.SetReceiveTimeout} {
		if err := set(&nl.SocketTimeoutTv); err != nil {
			s.Close()
			return nil, fmt.Errorf("vxlan: netlink socket timeout: %w", err)
		}
	}
	return &NeighSocket{sh: &nl.SocketHandle{Socket: s}}, nil
}

// Close closes the socket.
func (f *NeighSocket) Close() { f.sh.Close() }

// neighDumpRequest is the header of a dump of one device's entries:
// struct ndmsg, its padding zero. An FDB dump (AF_BRIDGE) names the
// device in the header; a neighbour dump must leave it zero there and
// names it in an attribute.
type neighDumpRequest struct {
	family  uint8
	ifindex int32
}

func (r neighDumpRequest) Len() int { return unix.SizeofNdMsg }

func (r neighDumpRequest) Serialize() []byte {
	b := make([]byte, unix.SizeofNdMsg)
	b[0] = r.family
	if r.family == unix.AF_BRIDGE {
		binary.NativeEndian.PutUint32(b[4:], uint32(r.ifindex))
	}
	return b
}

// list returns the entries of family (AF_BRIDGE: FDB; AF_INET:
// neighbours) of device idx. An error wrapping netlink.ErrDumpInterrupted
// comes with what was read.
func (f *NeighSocket) list(family uint8, idx int) ([]netlink.Neigh, error) {
	req := nl.NewNetlinkRequest(unix.RTM_GETNEIGH, unix.NLM_F_DUMP)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: f.sh}
	req.AddData(neighDumpRequest{family: family, ifindex: int32(idx)})
	if family != unix.AF_BRIDGE {
		req.AddData(nl.NewRtAttr(unix.NDA_IFINDEX, nl.Uint32Attr(uint32(idx))))
	}
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWNEIGH)
	if err != nil && !errors.Is(err, nl.ErrDumpInterrupted) {
		return nil, err
	}
	out := make([]netlink.Neigh, 0, len(msgs))
	for _, m := range msgs {
		n, derr := netlink.NeighDeserialize(m)
		if derr != nil {
			continue
		}
		out = append(out, *n)
	}
	if err != nil {
		err = netlink.ErrDumpInterrupted
	}
	return out, err
}

// dumpNeighs lists the entries of family of device idx: through the
// NeighSocket, or through the handle when there is none.
func (l *Linux) dumpNeighs(family uint8, idx int) ([]netlink.Neigh, error) {
	if l.neigh == nil {
		return retryDump(func() ([]netlink.Neigh, error) { return l.h.NeighList(idx, int(family)) })
	}
	return retryDump(func() ([]netlink.Neigh, error) { return l.neigh.list(family, idx) })
}

// DetectUnderlay finds the host's underlay in the network namespace of h.
// When addr is valid it is the interface that holds addr; otherwise it is
// the interface of the IPv4 default route (the one of lowest metric) and
// the route's preferred source, or the interface's first global IPv4
// address. It blocks while it talks to the kernel.
func DetectUnderlay(h *netlink.Handle, addr netip.Addr) (Underlay, error) {
	if addr.IsValid() {
		return underlayOf(h, addr)
	}
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_V4,
			&netlink.Route{Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST},
			netlink.RT_FILTER_TABLE|netlink.RT_FILTER_TYPE)
	})
	if err != nil {
		return Underlay{}, fmt.Errorf("vxlan: detect underlay: list routes: %w", err)
	}
	var def *netlink.Route
	for i, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if def == nil || r.Priority < def.Priority {
			def = &routes[i]
		}
	}
	if def == nil {
		return Underlay{}, errors.New("vxlan: detect underlay: no IPv4 default route: pass --underlay-addr")
	}
	idx := def.LinkIndex
	if idx == 0 && len(def.MultiPath) > 0 {
		idx = def.MultiPath[0].LinkIndex
	}
	link, err := h.LinkByIndex(idx)
	if err != nil {
		return Underlay{}, fmt.Errorf("vxlan: detect underlay: link %d of the IPv4 default route: %w", idx, err)
	}
	if src, ok := netip.AddrFromSlice(def.Src); ok && src.Unmap().Is4() {
		return Underlay{Addr: src.Unmap(), Link: link.Attrs().Name, MTU: link.Attrs().MTU}, nil
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(link, netlink.FAMILY_V4) })
	if err != nil {
		return Underlay{}, fmt.Errorf("vxlan: detect underlay: list addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, a := range addrs {
		p, ok := prefixOf(a.IPNet)
		if ok && a.Scope == int(netlink.SCOPE_UNIVERSE) {
			return Underlay{Addr: p.Addr(), Link: link.Attrs().Name, MTU: link.Attrs().MTU}, nil
		}
	}
	return Underlay{}, fmt.Errorf("vxlan: detect underlay: %s, the link of the IPv4 default route, has no global IPv4 address: pass --underlay-addr", link.Attrs().Name)
}

// underlayOf returns the underlay whose address is addr.
func underlayOf(h *netlink.Handle, addr netip.Addr) (Underlay, error) {
	if !addr.Is4() {
		return Underlay{}, fmt.Errorf("vxlan: detect underlay: %s is not an IPv4 address", addr)
	}
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_V4) })
	if err != nil {
		return Underlay{}, fmt.Errorf("vxlan: detect underlay: list addresses: %w", err)
	}
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet); !ok || p.Addr() != addr {
			continue
		}
		link, err := h.LinkByIndex(a.LinkIndex)
		if err != nil {
			return Underlay{}, fmt.Errorf("vxlan: detect underlay: link %d of %s: %w", a.LinkIndex, addr, err)
		}
		return Underlay{Addr: addr, Link: link.Attrs().Name, MTU: link.Attrs().MTU}, nil
	}
	return Underlay{}, fmt.Errorf("vxlan: detect underlay: no interface has address %s", addr)
}

// retryDump calls dump until it is not interrupted by a concurrent change,
// at most dumpAttempts times. The last, possibly partial, result is
// returned with ErrDumpInterrupted: it is safe to use for adding what is
// missing and deleting what was seen.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	for i := 1; ; i++ {
		out, err := dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) || i == dumpAttempts {
			return out, err
		}
	}
}

// isGone reports whether err says that the object a delete was meant for
// does not exist, which makes the delete a success.
func isGone(err error) bool {
	return isLinkNotFound(err) ||
		errors.Is(err, unix.ENOENT) ||
		errors.Is(err, unix.ESRCH) ||
		errors.Is(err, unix.EADDRNOTAVAIL)
}

// isLinkNotFound reports whether err says that a device does not exist.
func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// unicastMAC returns hw as a mac when it is a unicast, non-zero Ethernet
// address.
func unicastMAC(hw net.HardwareAddr) (mac, bool) {
	if len(hw) != len(mac{}) || hw[0]&1 != 0 {
		return mac{}, false
	}
	m := mac(hw)
	return m, m != mac{}
}

// prefixOf converts an IPv4 net.IPNet to a netip.Prefix.
func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, bits := n.Mask.Size()
	if !a.Is4() || bits != 32 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones), true
}

// ipNet converts p to a net.IPNet, keeping the host bits of its address.
func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
