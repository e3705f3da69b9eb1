package simnet

import (
	"context"
	"net"
	"net/netip"
	"path/filepath"
)

// OutsideAddr is the address of the namespace Internet makes: outside
// the overlay and the underlay (TEST-NET-3, RFC 5737), reached from the
// hosts through their default route.
var OutsideAddr = netip.MustParseAddr("203.0.113.1")

// Internet is a namespace standing for the world outside the overlay: it
// holds the hosts' default gateway on the underlay and OutsideAddr.
type Internet struct {
	// Name is its namespace.
	Name string
	// Addr is OutsideAddr.
	Addr netip.Addr
}

// AddInternet makes the run's Internet namespace, removed with the rest.
func (n *Net) AddInternet(ctx context.Context) (*Internet, error) {
	in := &Internet{Name: n.Prefix + "inet", Addr: OutsideAddr}
	if err := n.addNS(ctx, in.Name); err != nil {
		return nil, err
	}
	steps := [][]string{
		{"ip", "-n", n.Underlay, "link", "add", "pinet", "type", "veth", "peer", "name", "eth0", "netns", in.Name},
		{"ip", "-n", n.Underlay, "link", "set", "pinet", "master", "br0", "up"},
		{"ip", "-n", in.Name, "addr", "add", netip.PrefixFrom(defaultGateway, UnderlayCIDR.Bits()).String(), "dev", "eth0"},
		{"ip", "-n", in.Name, "addr", "add", netip.PrefixFrom(OutsideAddr, 32).String(), "dev", "lo"},
		{"ip", "-n", in.Name, "link", "set", "eth0", "up"},
	}
	for _, s := range steps {
		if err := run(ctx, s[0], s[1:]...); err != nil {
			return nil, err
		}
	}
	return in, nil
}

// Listen opens a TCP listener on the Internet's address, port port.
func (in *Internet) Listen(port int) (net.Listener, error) {
	var l net.Listener
	err := inNamespace(filepath.Join("/run/netns", in.Name), func() error {
		var err error
		l, err = net.Listen("tcp4", netip.AddrPortFrom(in.Addr, uint16(port)).String())
		return err
	})
	return l, err
}
