package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/overlaynet/overlay/cnirpc"
)

// requestTimeout bounds one exchange with overlayd.
const requestTimeout = 30 * time.Second

// hostVethPrefix starts the name of every host-side veth this plugin makes.
const hostVethPrefix = "ovl"

// NetConf is the plugin's configuration, the network's JSON on stdin.
type NetConf struct {
	types.PluginConf
	// Network is the overlay network's name; empty means the CNI
	// network's name.
	Network string `json:"network,omitempty"`
	// Socket is overlayd's socket; empty means cnirpc.DefaultSocket.
	Socket string `json:"socket,omitempty"`
}

func parseConf(data []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "decode network configuration", err.Error())
	}
	if conf.Network == "" {
		conf.Network = conf.Name
	}
	if conf.Network == "" {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "network configuration has neither \"network\" nor \"name\"", "")
	}
	if conf.Socket == "" {
		conf.Socket = cnirpc.DefaultSocket
	}
	return conf, nil
}

// plugin holds the verbs; it has no state.
type plugin struct{}

// hostVethName derives the host end's name from what identifies the
// attachment, so DEL finds it without any stored state.
func hostVethName(network, containerID, ifName string) string {
	sum := sha256.Sum256([]byte(network + "/" + containerID + "/" + ifName))
	return hostVethPrefix + hex.EncodeToString(sum[:])[:15-len(hostVethPrefix)]
}

func request(conf *NetConf, args *skel.CmdArgs) cnirpc.Request {
	return cnirpc.Request{Network: conf.Network, ContainerID: args.ContainerID, IfName: args.IfName}
}

// rpcError turns a failure to talk to overlayd into the CNI error JSON.
func rpcError(op string, err error) error {
	var e *cnirpc.Error
	if errors.As(err, &e) {
		return types.NewError(e.Code, e.Msg, e.Details)
	}
	if errors.Is(err, cnirpc.ErrUnavailable) {
		return types.NewError(types.ErrTryAgainLater, "overlayd is not reachable: is it running?", err.Error())
	}
	return types.NewError(types.ErrInternal, op+" failed", err.Error())
}

func (p *plugin) cmdAdd(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	client := cnirpc.NewClient(conf.Socket)
	att, err := client.Add(ctx, request(conf, args))
	if err != nil {
		return rpcError("add", err)
	}
	result, err := attach(conf, args, att)
	if err != nil {
		// Leave nothing behind: the address goes back only if this ADD
		// allocated it, so a failed second ADD keeps the first intact.
		if att.New {
			if derr := client.Del(ctx, request(conf, args)); derr != nil {
				fmt.Fprintf(os.Stderr, "overlay-cni: release address after failed ADD: %v\n", derr)
			}
		}
		return err
	}
	return types.PrintResult(result, conf.CNIVersion)
}

// attach creates the veth pair with its container end born in the
// container's namespace, then sets address, MTU and routes there.
func attach(conf *NetConf, args *skel.CmdArgs, att cnirpc.Attachment) (*current.Result, error) {
	target, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("open network namespace %q", args.Netns), err.Error())
	}
	defer target.Close()
	host, err := netlink.NewHandle()
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "netlink", err.Error())
	}
	defer host.Close()
	cont, err := netlink.NewHandleAt(target)
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "netlink in the container namespace", err.Error())
	}
	defer cont.Close()

	if _, err := cont.LinkByName(args.IfName); err == nil {
		return nil, types.NewError(types.ErrInternal, fmt.Sprintf("interface %q already exists in the container", args.IfName), "")
	}
	br, err := host.LinkByName(att.Bridge)
	if err != nil {
		return nil, types.NewError(types.ErrTryAgainLater, fmt.Sprintf("bridge %s not found: overlayd has not programmed this host yet", att.Bridge), err.Error())
	}
	hostName := hostVethName(conf.Network, args.ContainerID, args.IfName)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostName, MTU: att.MTU, MasterIndex: br.Attrs().Index},
		PeerName:      args.IfName,
		PeerNamespace: netlink.NsFd(target),
	}
	if err := host.LinkAdd(veth); err != nil {
		return nil, types.NewError(types.ErrInternal, fmt.Sprintf("create veth %s/%s", hostName, args.IfName), err.Error())
	}
	result, err := configure(host, cont, hostName, args, att)
	if err != nil {
		if link, lerr := host.LinkByName(hostName); lerr == nil {
			_ = host.LinkDel(link)
		}
		return nil, err
	}
	result.DNS = conf.DNS
	return result, nil
}

func configure(host, cont *netlink.Handle, hostName string, args *skel.CmdArgs, att cnirpc.Attachment) (*current.Result, error) {
	fail := func(what string, err error) (*current.Result, error) {
		return nil, types.NewError(types.ErrInternal, what, err.Error())
	}
	hostLink, err := host.LinkByName(hostName)
	if err != nil {
		return fail("find host veth", err)
	}
	if err := host.LinkSetUp(hostLink); err != nil {
		return fail("set host veth up", err)
	}
	link, err := cont.LinkByName(args.IfName)
	if err != nil {
		return fail("find container interface", err)
	}
	if err := cont.LinkSetMTU(link, att.MTU); err != nil {
		return fail("set container MTU", err)
	}
	ipnet := prefixIPNet(att.Addr)
	if err := cont.AddrAdd(link, &netlink.Addr{IPNet: ipnet}); err != nil {
		return fail("add container address", err)
	}
	if err := cont.LinkSetUp(link); err != nil {
		return fail("set container interface up", err)
	}
	gw := net.IP(att.Gateway.AsSlice())
	defaultDst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if err := cont.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: defaultDst, Gw: gw}); err != nil {
		return fail("add default route", err)
	}
	return &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: hostName, Mac: hostLink.Attrs().HardwareAddr.String(), Mtu: att.MTU},
			{Name: args.IfName, Mac: link.Attrs().HardwareAddr.String(), Mtu: att.MTU, Sandbox: args.Netns},
		},
		IPs:    []*current.IPConfig{{Address: *ipnet, Gateway: gw, Interface: current.Int(1)}},
		Routes: []*types.Route{{Dst: *defaultDst, GW: gw}},
	}, nil
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func (p *plugin) cmdDel(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	// Local cleanup first, from names alone: deleting the host end takes
	// the container end with it, and works when the namespace is gone.
	if host, err := netlink.NewHandle(); err == nil {
		if link, err := host.LinkByName(hostVethName(conf.Network, args.ContainerID, args.IfName)); err == nil {
			if err := host.LinkDel(link); err != nil {
				var nf netlink.LinkNotFoundError
				if !errors.As(err, &nf) {
					host.Close()
					return types.NewError(types.ErrInternal, "delete host veth", err.Error())
				}
			}
		}
		host.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	if err := cnirpc.NewClient(conf.Socket).Del(ctx, request(conf, args)); err != nil {
		return rpcError("del", err)
	}
	return nil
}

func (p *plugin) cmdCheck(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return types.NewError(types.ErrDecodingFailure, "decode prevResult", err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	att, err := cnirpc.NewClient(conf.Socket).Check(ctx, request(conf, args))
	if err != nil {
		return rpcError("check", err)
	}
	if conf.PrevResult != nil {
		prev, err := current.NewResultFromResult(conf.PrevResult)
		if err != nil {
			return types.NewError(types.ErrDecodingFailure, "convert prevResult", err.Error())
		}
		if !hasIP(prev, att.Addr) {
			return types.NewError(types.ErrInternal, fmt.Sprintf("prevResult does not hold overlayd's address %s for this container", att.Addr), "")
		}
	}
	target, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("open network namespace %q", args.Netns), err.Error())
	}
	defer target.Close()
	cont, err := netlink.NewHandleAt(target)
	if err != nil {
		return types.NewError(types.ErrInternal, "netlink in the container namespace", err.Error())
	}
	defer cont.Close()
	return checkContainer(cont, args.IfName, att)
}

func hasIP(r *current.Result, p netip.Prefix) bool {
	for _, ip := range r.IPs {
		if a, ok := netip.AddrFromSlice(ip.Address.IP); ok && a.Unmap() == p.Addr() {
			return true
		}
	}
	return false
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

// cmdStatus answers whether an ADD can be served now: code 50 when
// overlayd cannot be reached or cannot allocate.
func (p *plugin) cmdStatus(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	st, err := cnirpc.NewClient(conf.Socket).Status(ctx, conf.Network)
	if err != nil {
		var e *cnirpc.Error
		if errors.As(err, &e) && e.Code != cnirpc.CodeInternal {
			return types.NewError(e.Code, e.Msg, e.Details)
		}
		return types.NewError(types.ErrPluginNotAvailable, "overlayd is not reachable: is it running?", err.Error())
	}
	if !st.Ready {
		return types.NewError(types.ErrPluginNotAvailable, "overlayd cannot serve ADD: "+st.Reason, "")
	}
	return nil
}
