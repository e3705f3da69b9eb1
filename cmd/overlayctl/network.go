package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

func networkCmd(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("network: want create, list, inspect or delete")
	}
	switch args[0] {
	case "create":
		return networkCreate(ctx, c, args[1:], stdout, stderr)
	case "list", "ls":
		return networkList(ctx, c, args[1:], stdout, stderr)
	case "inspect", "show":
		return networkInspect(ctx, c, args[1:], stdout, stderr)
	case "delete", "rm":
		return networkDelete(ctx, c, args[1:], stdout, stderr)
	}
	return usagef("network: unknown command %q (want create, list, inspect or delete)", args[0])
}

// parse parses args, which hold the flags and, before or after them,
// exactly names positional arguments.
func parse(fs *flag.FlagSet, args []string, names int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usageError{err.Error()}
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if len(pos) != names {
		return nil, usagef("%s: want %d argument(s), got %q", fs.Name(), names, pos)
	}
	return pos, nil
}

// labels is a repeatable KEY=VALUE flag.
type labels map[string]string

func (l labels) String() string { return "" }

func (l labels) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("label %q: want KEY=VALUE", s)
	}
	l[k] = v
	return nil
}

func parseVNIRange(s string) (etcd.VNIRange, error) {
	a, b, ok := strings.Cut(s, "-")
	first, err1 := strconv.ParseUint(a, 10, 32)
	last, err2 := strconv.ParseUint(b, 10, 32)
	r := etcd.VNIRange{First: uint32(first), Last: uint32(last)}
	if !ok || err1 != nil || err2 != nil {
		return r, fmt.Errorf("--vni-range %q: want FIRST-LAST, such as %s", s, etcd.DefaultVNIRange)
	}
	if err := r.Validate(); err != nil {
		return r, fmt.Errorf("--vni-range: %w", err)
	}
	return r, nil
}

func networkCreate(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("network create", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cidr := fs.String("cidr", "", "address space of the network, such as 10.20.0.0/16 (required)")
	blockBits := fs.Int("block-bits", overlay.DefaultBlockBits, "prefix length of the blocks hosts claim (26 = 64 addresses)")
	vni := fs.Uint("vni", 0, "VXLAN network identifier; 0 takes the lowest free one of --vni-range")
	vniRange := fs.String("vni-range", etcd.DefaultVNIRange.String(), "where a network without --vni takes its VNI")
	port := fs.Uint("vxlan-port", overlay.DefaultPort, "VXLAN UDP port")
	mtu := fs.Int("mtu", 0, "MTU of the network's devices and containers; 0 derives it on each host from the underlay")
	masq := fs.Bool("masquerade", true, "masquerade the network's egress to the host's address (false: containers reach outside addresses with their own)")
	lbls := labels{}
	fs.Var(lbls, "label", "KEY=VALUE label on the network (repeatable)")
	asJSON := fs.Bool("json", false, "print the created network as JSON")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	if *cidr == "" {
		return usagef("network create: --cidr is required")
	}
	prefix, err := netip.ParsePrefix(*cidr)
	if err != nil {
		return usagef("--cidr %q: want an IPv4 prefix such as 10.20.0.0/16", *cidr)
	}
	if *vni > overlay.MaxVNI {
		return usagef("--vni %d: want 1 to %d, or 0 for a free one", *vni, overlay.MaxVNI)
	}
	if *port == 0 || *port > 65535 {
		return usagef("--vxlan-port %d: want 1 to 65535", *port)
	}
	r, err := parseVNIRange(*vniRange)
	if err != nil {
		return usageError{err.Error()}
	}
	n := overlay.Network{Name: pos[0], CIDR: prefix, BlockBits: *blockBits, VNI: uint32(*vni), Port: uint16(*port), MTU: *mtu}
	if len(lbls) > 0 {
		n.Labels = lbls
	}
	if !*masq {
		n.Masquerade = masq
	}
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return err
	}
	defer closeStore()
	created, err := store.CreateNetwork(ctx, n, r)
	if err != nil {
		return fmt.Errorf("network create %s: %w", n.Name, err)
	}
	if *asJSON {
		return printJSON(stdout, created)
	}
	fmt.Fprintf(stdout, "created network %s: cidr %s, blocks of /%d, vni %d, id %s\n", created.Name, created.CIDR, created.BlockBits, created.VNI, created.ID)
	return nil
}

func networkList(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("network list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the networks as a JSON array")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return err
	}
	defer closeStore()
	list, err := store.Networks(ctx)
	if err != nil && list == nil {
		return fmt.Errorf("network list: %w", err)
	}
	if err != nil {
		fmt.Fprintf(stderr, "overlayctl: warning: %v\n", err)
	}
	if *asJSON {
		if list == nil {
			list = []overlay.Network{}
		}
		return printJSON(stdout, list)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tCIDR\tBLOCK\tVNI\tPORT\tMTU\tMASQUERADE\tLABELS\tID")
	for _, n := range list {
		fmt.Fprintf(tw, "%s\t%s\t/%d\t%d\t%d\t%s\t%s\t%s\t%s\n", n.Name, n.CIDR, n.BlockBits, n.VNI, n.Port, mtuText(n.MTU), onOff(n.MasqueradeOn()), labelText(n.Labels), idText(n.ID))
	}
	return tw.Flush()
}

// inspection is what network inspect shows.
type inspection struct {
	overlay.Network
	// Blocks counts the blocks each host holds.
	Blocks map[overlay.HostID]int `json:"blocksByHost"`
	// Interfaces counts the container interfaces of each host.
	Interfaces map[overlay.HostID]int `json:"interfacesByHost"`
}

func networkInspect(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("network inspect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the network as JSON")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return err
	}
	defer closeStore()
	n, err := store.Network(ctx, pos[0])
	if err != nil {
		return fmt.Errorf("network inspect: %w", err)
	}
	owners, err := store.Pool(n, "").Owners(ctx)
	if err != nil {
		return fmt.Errorf("network inspect %s: %w", n.Name, err)
	}
	use, err := store.Use(ctx, n.Name)
	if err != nil {
		return fmt.Errorf("network inspect %s: %w", n.Name, err)
	}
	out := inspection{Network: n, Blocks: make(map[overlay.HostID]int), Interfaces: use.Hosts}
	for _, h := range owners {
		out.Blocks[h]++
	}
	if *asJSON {
		return printJSON(stdout, out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "name:\t%s\nid:\t%s\ncidr:\t%s (%d blocks of /%d)\nvni:\t%d\nvxlan port:\t%d\nmtu:\t%s\nmasquerade:\t%s\nlabels:\t%s\n",
		n.Name, idText(n.ID), n.CIDR, n.NumBlocks(), n.BlockBits, n.VNI, n.Port, mtuText(n.MTU), onOff(n.MasqueradeOn()), labelText(n.Labels))
	tw.Flush()
	hosts := slices.Collect(maps.Keys(out.Blocks))
	for h := range out.Interfaces {
		if _, ok := out.Blocks[h]; !ok {
			hosts = append(hosts, h)
		}
	}
	slices.Sort(hosts)
	if len(hosts) > 0 {
		fmt.Fprintln(tw, "\nHOST\tBLOCKS\tINTERFACES")
		for _, h := range hosts {
			fmt.Fprintf(tw, "%s\t%d\t%d\n", h, out.Blocks[h], out.Interfaces[h])
		}
	}
	return tw.Flush()
}

func networkDelete(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("network delete", flag.ContinueOnError)
	fs.SetOutput(stderr)
	force := fs.Bool("force", false, "delete even while containers hold addresses of it: their addresses are released and their interfaces cut off on every host")
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return err
	}
	defer closeStore()
	use, err := store.DeleteNetwork(ctx, pos[0], *force)
	if err != nil {
		return fmt.Errorf("network delete: %w", err)
	}
	if n := use.Interfaces(); n > 0 {
		fmt.Fprintf(stdout, "deleted network %s; released the addresses of %d container interfaces (%s): remove those containers\n", pos[0], n, use)
		return nil
	}
	fmt.Fprintf(stdout, "deleted network %s; every overlayd removes its devices\n", pos[0])
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func mtuText(mtu int) string {
	if mtu == 0 {
		return "auto"
	}
	return strconv.Itoa(mtu)
}

func idText(id string) string {
	if id == "" {
		return "-"
	}
	return id
}

func labelText(l map[string]string) string {
	if len(l) == 0 {
		return "-"
	}
	var out []string
	for _, k := range slices.Sorted(maps.Keys(l)) {
		out = append(out, k+"="+l[k])
	}
	return strings.Join(out, ",")
}
