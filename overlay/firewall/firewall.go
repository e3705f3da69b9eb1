// Package firewall keeps the overlay's nftables table: isolation between
// overlay networks and the masquerade of their egress. The rules are a
// pure function of the networks (Rules); the Linux side (Table) converges
// the kernel's table to them through netlink (google/nftables), never
// through a command.
package firewall

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/overlaynet/overlay/overlay"
)

// TableName is the nftables table (family ip) the overlay owns. Rules of
// any other table are left alone, and rules added by hand to this one are
// removed.
const TableName = "overlayd"

// Kind says what a rule does.
type Kind int

const (
	// Isolate drops a packet that arrives on one network's device and
	// leaves on another network's device.
	Isolate Kind = iota
	// Masquerade rewrites the source of a packet from a network's
	// address space that leaves the host on a device that is not an
	// overlay device, to the address of that device.
	Masquerade
)

// Rule is one rule of the table.
type Rule struct {
	// Kind is what it does.
	Kind Kind
	// Network is the network it is for.
	Network string
	// In and OutPrefix, for Isolate: a packet that arrives on device In
	// and leaves on a device whose name starts with OutPrefix but is not
	// Out is dropped.
	In, OutPrefix, Out string
	// CIDR, for Masquerade, is the network's address space.
	CIDR string
}

// Comment describes the rule; it is the rule's nftables comment, which
// nft list shows, and what the convergence compares.
func (r Rule) Comment() string {
	switch r.Kind {
	case Isolate:
		return fmt.Sprintf("overlay %s: drop %s to %s* but %s", r.Network, r.In, r.OutPrefix, r.Out)
	default:
		return fmt.Sprintf("overlay %s: masquerade %s leaving the overlay", r.Network, r.CIDR)
	}
}

// Rules returns the rules for networks, in table order: for each
// network, four isolation rules (its bridge and its VXLAN device, each to
// the other networks' bridges and VXLAN devices), and, unless its
// masquerade is off, one masquerade rule. Their number grows with the
// networks, never with the containers.
func Rules(networks []overlay.Network) (forward, postrouting []Rule) {
	nets := slices.Clone(networks)
	slices.SortFunc(nets, func(a, b overlay.Network) int { return cmp.Compare(a.Name, b.Name) })
	for _, n := range nets {
		for _, in := range []string{n.BridgeName(), n.VXLANName()} {
			forward = append(forward,
				Rule{Kind: Isolate, Network: n.Name, In: in, OutPrefix: overlay.BridgePrefix, Out: n.BridgeName()},
				Rule{Kind: Isolate, Network: n.Name, In: in, OutPrefix: overlay.VXLANPrefix, Out: n.VXLANName()})
		}
		if n.MasqueradeOn() {
			postrouting = append(postrouting, Rule{Kind: Masquerade, Network: n.Name, CIDR: n.CIDR.String()})
		}
	}
	return forward, postrouting
}
