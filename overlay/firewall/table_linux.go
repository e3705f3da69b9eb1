package firewall

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/overlaynet/overlay/overlay"
)

// Chain names of the table.
const (
	forwardChain     = "forward"
	postroutingChain = "postrouting"
)

// Table is the overlay's nftables table in one network namespace. It is
// not safe for concurrent use.
type Table struct {
	conn *nftables.Conn
}

// New returns the table of the caller's network namespace, or, with
// nftables.WithNetNSFd, of another one.
func New(opts ...nftables.ConnOption) (*Table, error) {
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return &Table{conn: c}, nil
}

func (t *Table) table() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyIPv4}
}

// Set converges the table to the rules of networks (Rules). When the
// table already holds exactly those rules (compared by their comments)
// it changes nothing and returns false; otherwise it replaces the whole
// table in one nftables transaction, so that no packet ever sees it half
// written, and returns true.
func (t *Table) Set(networks []overlay.Network) (bool, error) {
	forward, post := Rules(networks)
	if t.holds(forward, post) {
		return false, nil
	}
	tbl := t.table()
	// Add, then delete: the table exists for the deletion whether or
	// not it existed before; the transaction makes it one change.
	t.conn.AddTable(tbl)
	t.conn.DelTable(tbl)
	tbl = t.conn.AddTable(tbl)
	accept := nftables.ChainPolicyAccept
	fwd := t.conn.AddChain(&nftables.Chain{Name: forwardChain, Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	nat := t.conn.AddChain(&nftables.Chain{Name: postroutingChain, Table: tbl, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	for _, r := range forward {
		t.conn.AddRule(&nftables.Rule{Table: tbl, Chain: fwd, Exprs: isolateExprs(r), UserData: comment(r)})
	}
	for _, r := range post {
		exprs, err := masqueradeExprs(r)
		if err != nil {
			return false, err
		}
		t.conn.AddRule(&nftables.Rule{Table: tbl, Chain: nat, Exprs: exprs, UserData: comment(r)})
	}
	if err := t.conn.Flush(); err != nil {
		return false, fmt.Errorf("nftables: write table %s: %w", TableName, err)
	}
	return true, nil
}

// Delete removes the table. A table that does not exist is not an error.
func (t *Table) Delete() error {
	tbl := t.table()
	t.conn.AddTable(tbl)
	t.conn.DelTable(tbl)
	if err := t.conn.Flush(); err != nil {
		return fmt.Errorf("nftables: delete table %s: %w", TableName, err)
	}
	return nil
}

// Comments returns the comments of the table's rules, chain by chain, or
// nil slices when the table does not exist.
func (t *Table) Comments() (forward, postrouting []string, err error) {
	tbl, err := t.conn.ListTableOfFamily(TableName, nftables.TableFamilyIPv4)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOENT) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("nftables: read table %s: %w", TableName, err)
	}
	read := func(chain string) ([]string, error) {
		rules, err := t.conn.GetRules(tbl, &nftables.Chain{Name: chain, Table: tbl})
		if err != nil {
			return nil, err
		}
		out := make([]string, 0, len(rules))
		for _, r := range rules {
			c, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			out = append(out, c)
		}
		return out, nil
	}
	if forward, err = read(forwardChain); err != nil {
		return nil, nil, fmt.Errorf("nftables: read chain %s: %w", forwardChain, err)
	}
	if postrouting, err = read(postroutingChain); err != nil {
		return nil, nil, fmt.Errorf("nftables: read chain %s: %w", postroutingChain, err)
	}
	return forward, postrouting, nil
}

// Check compares the table with the rules of networks (Rules), by their
// comments, and returns those it lacks and those it holds that networks
// do not ask for; a table that does not exist lacks them all. It changes
// nothing.
func (t *Table) Check(networks []overlay.Network) (missing, stale []string, err error) {
	forward, post := Rules(networks)
	gotF, gotP, err := t.Comments()
	if err != nil {
		return nil, nil, err
	}
	have := make(map[string]int)
	for _, c := range append(gotF, gotP...) {
		have[c]++
	}
	for _, c := range append(comments(forward), comments(post)...) {
		if have[c] > 0 {
			have[c]--
			continue
		}
		missing = append(missing, c)
	}
	for c, n := range have {
		for range n {
			stale = append(stale, c)
		}
	}
	slices.Sort(stale)
	return missing, stale, nil
}

// holds reports whether the table holds exactly the rules given. A table
// or chain that cannot be read (deleted by hand) does not: it is
// rewritten.
func (t *Table) holds(forward, post []Rule) bool {
	gotF, gotP, err := t.Comments()
	if err != nil || gotF == nil {
		return false
	}
	return slices.Equal(gotF, comments(forward)) && slices.Equal(gotP, comments(post))
}

func comments(rules []Rule) []string {
	out := make([]string, len(rules))
	for i, r := range rules {
		out[i] = r.Comment()
	}
	return out
}

func comment(r Rule) []byte { return userdata.AppendString(nil, userdata.TypeComment, r.Comment()) }

// ifname returns name as the kernel holds an interface name: IFNAMSIZ
// bytes, NUL-padded.
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

// isolateExprs: iifname In, oifname OutPrefix*, oifname != Out: drop.
func isolateExprs(r Rule) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(r.In)},
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		// A shorter comparison matches a prefix, as nft's "ovbr-*".
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(r.OutPrefix)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifname(r.Out)},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}
}

// masqueradeExprs: ip saddr CIDR, oifname not an overlay device:
// masquerade.
func masqueradeExprs(r Rule) ([]expr.Any, error) {
	p, err := netip.ParsePrefix(r.CIDR)
	if err != nil || !p.Addr().Is4() {
		return nil, fmt.Errorf("nftables: masquerade rule of %s: bad cidr %q", r.Network, r.CIDR)
	}
	mask := make([]byte, 4)
	binary.BigEndian.PutUint32(mask, ^uint32(0)<<(32-p.Bits()))
	addr := p.Masked().Addr().As4()
	return []expr.Any{
		// The IPv4 source address: 4 bytes at offset 12 of the header.
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr[:]},
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte(overlay.BridgePrefix)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte(overlay.VXLANPrefix)},
		&expr.Counter{},
		&expr.Masq{},
	}, nil
}
