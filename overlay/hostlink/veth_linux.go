package hostlink

import (
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Veth is a veth pair to create: its host end on a bridge, its container
// end born in the container's namespace.
type Veth struct {
	// HostName and HostMAC name the host end; it is created up.
	HostName string
	HostMAC  net.HardwareAddr
	// Master is the index of the bridge the host end joins.
	Master int
	// MTU is both ends' MTU.
	MTU int
	// PeerName names the container end; PeerMAC, when not nil, is its MAC.
	PeerName string
	PeerMAC  net.HardwareAddr
	// PeerNS is the namespace the container end is born in.
	PeerNS netns.NsHandle
}

// AddVeth creates v in one RTM_NEWLINK request: netlink.LinkAdd would take
// two more, to look the host end up and to enslave it. A host end or a
// container end that exists already is an error wrapping unix.EEXIST.
func AddVeth(v Veth) error {
	req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Flags, msg.Change = unix.IFF_UP, unix.IFF_UP
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(v.HostName)))
	req.AddData(nl.NewRtAttr(unix.IFLA_ADDRESS, v.HostMAC))
	req.AddData(nl.NewRtAttr(unix.IFLA_MTU, nl.Uint32Attr(uint32(v.MTU))))
	req.AddData(nl.NewRtAttr(unix.IFLA_MASTER, nl.Uint32Attr(uint32(v.Master))))
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("veth"))
	peer := info.AddRtAttr(nl.IFLA_INFO_DATA, nil).AddRtAttr(nl.VETH_INFO_PEER, nil)
	nl.NewIfInfomsgChild(peer, unix.AF_UNSPEC)
	peer.AddRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(v.PeerName))
	peer.AddRtAttr(unix.IFLA_MTU, nl.Uint32Attr(uint32(v.MTU)))
	if v.PeerMAC != nil {
		peer.AddRtAttr(unix.IFLA_ADDRESS, []byte(v.PeerMAC))
	}
	peer.AddRtAttr(unix.IFLA_NET_NS_FD, nl.Uint32Attr(uint32(v.PeerNS)))
	req.AddData(info)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// IfIndex returns the index of the interface name of the calling
// thread's namespace, by ioctl: a netlink lookup would decode every
// attribute of the link.
func IfIndex(name string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("index of %s: %w", name, err)
	}
	return int(ifr.Uint32()), nil
}

// DeleteStale deletes every veth on bridge whose name starts with prefix
// and is not in keep. A bridge that does not exist has none.
func (l Links) DeleteStale(bridge, prefix string, keep map[string]bool) error {
	br, err := l.h.LinkByName(bridge)
	if Vanished(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("find bridge %s: %w", bridge, err)
	}
	links, err := l.h.LinkList()
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("list links: %w", err)
	}
	var errs []error
	for _, link := range links {
		a := link.Attrs()
		if link.Type() != "veth" || a.MasterIndex != br.Attrs().Index || !strings.HasPrefix(a.Name, prefix) || keep[a.Name] {
			continue
		}
		errs = append(errs, l.DeleteLink(link))
	}
	return errors.Join(errs...)
}
