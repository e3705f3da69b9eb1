//go:build linux

package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/hostlink"
)

// attach creates the veth pair with its container end born in the
// container's namespace cont, sets address and routes there, then calls
// confirm. When configuring or confirm fails, it removes the pair.
func attach(conf *NetConf, args *skel.CmdArgs, cont *container, att cnirpc.Attachment, confirm func() error) (*current.Result, error) {
	bridge, err := hostlink.IfIndex(att.Bridge)
	if err != nil {
		return nil, types.NewError(types.ErrTryAgainLater, fmt.Sprintf("bridge %s not found: overlayd has not programmed this host yet", att.Bridge), err.Error())
	}
	hostName := hostVethName(conf, args)
	hostMAC := overlay.RandomMAC()
	// The container's MAC address is the endpoint's, which overlayd
	// recorded with the address (the runtime's, or one it picked); an
	// older overlayd sends none, and the kernel picks one.
	peerMAC := conf.mac
	if att.MAC != "" {
		mac, err := net.ParseMAC(att.MAC)
		if err != nil {
			return nil, types.NewError(types.ErrInternal, fmt.Sprintf("overlayd sent the MAC address %q", att.MAC), err.Error())
		}
		peerMAC = mac
	}
	veth := hostlink.Veth{HostName: hostName, HostMAC: hostMAC, Master: bridge, MTU: att.MTU, PeerName: args.IfName, PeerMAC: peerMAC, PeerNS: cont.ns}
	if err := hostlink.AddVeth(veth); err != nil {
		// An existing interface is found out here rather than looked for
		// beforehand: the lookup would cost every ADD a round trip.
		if errors.Is(err, unix.EEXIST) {
			if h, herr := cont.Handle(); herr == nil {
				if _, lerr := h.LinkByName(args.IfName); lerr == nil {
					return nil, types.NewError(types.ErrInternal, fmt.Sprintf("interface %q already exists in the container", args.IfName), err.Error())
				}
			}
			return nil, types.NewError(types.ErrInternal, fmt.Sprintf("host interface %s already exists: this container interface is attached already", hostName), err.Error())
		}
		return nil, types.NewError(types.ErrInternal, fmt.Sprintf("create veth %s/%s", hostName, args.IfName), err.Error())
	}
	var result *current.Result
	h, err := cont.Handle()
	if err == nil {
		result, err = configure(h, hostName, hostMAC, args, att)
	}
	if err == nil {
		err = confirm()
	}
	if err != nil {
		if derr := deleteHostVeth(hostName); derr != nil {
			// The veth may still hold the address: keep it allocated.
			return nil, &keepAddress{types.NewError(types.ErrInternal, err.Error()+"; and removing the veth failed", derr.Error())}
		}
		return nil, err
	}
	result.DNS = conf.DNS
	return result, nil
}

func configure(cont *netlink.Handle, hostName string, hostMAC net.HardwareAddr, args *skel.CmdArgs, att cnirpc.Attachment) (*current.Result, error) {
	fail := func(what string, err error) (*current.Result, error) {
		return nil, types.NewError(types.ErrInternal, what, err.Error())
	}
	link, err := cont.LinkByName(args.IfName)
	if err != nil {
		return fail("find container interface", err)
	}
	ipnet := prefixIPNet(att.Addr)
	if err := cont.AddrAdd(link, &netlink.Addr{IPNet: ipnet}); err != nil {
		return fail("add container address", err)
	}
	if err := cont.LinkSetUp(link); err != nil {
		return fail("set container interface up", err)
	}
	gw := net.IP(att.Gateway.AsSlice())
	// The first overlay interface of a container takes the default
	// route; one on a further network, which finds it taken, a route to
	// its network's address space. Trying first costs no lookup.
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	err = cont.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: dst, Gw: gw})
	if errors.Is(err, unix.EEXIST) && att.Subnet.IsValid() {
		dst = prefixIPNet(att.Subnet)
		err = cont.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: dst, Gw: gw})
	}
	if err != nil {
		return fail(fmt.Sprintf("add the route to %s", dst), err)
	}
	return &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: hostName, Mac: hostMAC.String(), Mtu: att.MTU},
			{Name: args.IfName, Mac: link.Attrs().HardwareAddr.String(), Mtu: att.MTU, Sandbox: args.Netns},
		},
		IPs:    []*current.IPConfig{{Address: *ipnet, Gateway: gw, Interface: current.Int(1)}},
		Routes: []*types.Route{{Dst: *dst, GW: gw}},
	}, nil
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// checkNamespace checks the interface in the container's namespace cont
// against overlayd's attachment.
func checkNamespace(cont *container, args *skel.CmdArgs, att cnirpc.Attachment) error {
	h, err := cont.Handle()
	if err != nil {
		return err
	}
	return checkContainer(h, args.IfName, att)
}

// checkContainer verifies that the container interface holds overlayd's
// address and a route through the gateway. Extra addresses and routes,
// such as those of chained plugins, are tolerated.
func checkContainer(cont *netlink.Handle, ifName string, att cnirpc.Attachment) error {
	link, err := cont.LinkByName(ifName)
	if err != nil {
		return types.NewError(types.ErrInternal, fmt.Sprintf("interface %q is missing from the container", ifName), err.Error())
	}
	addrs, err := cont.AddrList(link, netlink.FAMILY_V4)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return types.NewError(types.ErrInternal, "list container addresses", err.Error())
	}
	found := false
	for _, a := range addrs {
		if p, ok := netip.AddrFromSlice(a.IP); ok && p.Unmap() == att.Addr.Addr() {
			ones, _ := a.Mask.Size()
			found = ones == att.Addr.Bits()
		}
	}
	if !found {
		return types.NewError(types.ErrInternal, fmt.Sprintf("address %s is missing from %s", att.Addr, ifName), "")
	}
	routes, err := cont.RouteList(link, netlink.FAMILY_V4)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return types.NewError(types.ErrInternal, "list container routes", err.Error())
	}
	for _, r := range routes {
		if gw, ok := netip.AddrFromSlice(r.Gw); ok && gw.Unmap() == att.Gateway {
			return nil
		}
	}
	return types.NewError(types.ErrInternal, fmt.Sprintf("no route via the gateway %s on %s", att.Gateway, ifName), "")
}

// deleteHostVeth deletes the host end of a veth pair; one that does not
// exist is not an error.
func deleteHostVeth(name string) error {
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer host.Close()
	return hostlink.New(host).Delete(name)
}

// deleteStaleVeths deletes every veth of this plugin on bridge whose name
// is not in keep.
func deleteStaleVeths(bridge string, keep map[string]bool) error {
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer host.Close()
	return hostlink.New(host).DeleteStale(bridge, overlay.HostVethPrefix, keep)
}
