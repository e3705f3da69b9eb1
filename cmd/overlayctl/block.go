package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"text/tabwriter"
	"time"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

func blockCmd(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("block: want list")
	}
	switch args[0] {
	case "list", "ls":
		return blockList(ctx, c, args[1:], stdout, stderr)
	}
	return usagef("block: unknown command %q (want list)", args[0])
}

// blockView is one block as `block list` shows it.
type blockView struct {
	Network string `json:"network"`
	etcd.BlockState
	// Live is whether the owner's liveness key exists.
	Live bool `json:"live"`
}

// blockList lists the claimed blocks of every network (or one), with
// their owner, whether the owner is alive, and etcd's count of their
// addresses.
func blockList(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("block list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the blocks as JSON")
	network := fs.String("network", "", "only the blocks of this network")
	host := fs.String("host", "", "only the blocks of this host ID")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return err
	}
	defer closeStore()
	var nets []overlay.Network
	if *network != "" {
		n, err := store.Network(ctx, *network)
		if err != nil {
			return fmt.Errorf("block list: %w", err)
		}
		nets = []overlay.Network{n}
	} else if nets, err = store.Networks(ctx); err != nil && !errors.Is(err, etcd.ErrBadRecord) {
		return fmt.Errorf("block list: %w", err)
	}
	bad := err
	states, err := store.HostStates(ctx)
	if err != nil && !errors.Is(err, etcd.ErrBadRecord) {
		return fmt.Errorf("block list: %w", err)
	}
	live := make(map[overlay.HostID]bool)
	for _, st := range states {
		live[st.Host] = st.Live != nil
	}
	list := []blockView{}
	for _, n := range nets {
		blocks, err := store.Blocks(ctx, n)
		if err != nil {
			return fmt.Errorf("block list: %w", err)
		}
		for _, b := range blocks {
			if *host == "" || b.Host == overlay.HostID(*host) {
				list = append(list, blockView{Network: n.Name, BlockState: b, Live: live[b.Host]})
			}
		}
	}
	if *asJSON {
		err = printJSON(stdout, list)
	} else {
		now := time.Now()
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NETWORK\tBLOCK\tHOST\tOWNER\tADDRESSES\tCLAIMED")
		for _, b := range list {
			owner := "alive"
			if !b.Live {
				owner = "down"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", b.Network, b.Block, b.Host, owner, b.Addresses, ago(now, b.Claimed))
		}
		err = tw.Flush()
	}
	if err != nil {
		return err
	}
	if bad != nil {
		return fmt.Errorf("block list: some records were left out: %w", bad)
	}
	return nil
}

// addressCmd answers who holds an address.
func addressCmd(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("address: want holder or release")
	}
	switch args[0] {
	case "holder", "who":
		return addressHolder(ctx, c, args[1:], stdout, stderr)
	case "release":
		return addressRelease(ctx, c, args[1:], stdout, stderr)
	}
	return usagef("address: unknown command %q (want holder or release)", args[0])
}

// holderView is who holds an address, as `address holder` shows it.
type holderView struct {
	Network string       `json:"network"`
	Address netip.Addr   `json:"address"`
	Block   netip.Prefix `json:"block"`
	// BlockHost owns the address's block; "" when it is not claimed.
	BlockHost overlay.HostID `json:"blockHost,omitempty"`
	// Holder is etcd's record of the address; nil when none holds it.
	Holder *etcd.AddrRecord `json:"holder,omitempty"`
}

// addressHolder says who holds an address of a network: the owner of its
// block, and the container etcd's copy says holds it.
func addressHolder(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("address holder", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	pos, err := parse(fs, args, 2)
	if err != nil {
		return err
	}
	a, err := netip.ParseAddr(pos[1])
	if err != nil || !a.Is4() {
		return usagef("address holder: %q is not an IPv4 address", pos[1])
	}
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return err
	}
	defer closeStore()
	n, err := store.Network(ctx, pos[0])
	if err != nil {
		return fmt.Errorf("address holder: %w", err)
	}
	if !n.CIDR.Contains(a) {
		return fmt.Errorf("address holder: %s is not in network %s (%s)", a, n.Name, n.CIDR)
	}
	v := holderView{Network: n.Name, Address: a, Block: netip.PrefixFrom(a, n.BlockBits).Masked()}
	blocks, err := store.Blocks(ctx, n)
	if err != nil {
		return fmt.Errorf("address holder: %w", err)
	}
	for _, b := range blocks {
		if b.Block == v.Block {
			v.BlockHost = b.Host
		}
	}
	rec, err := store.Holder(ctx, n, a)
	switch {
	case err == nil:
		v.Holder = &rec
	case !errors.Is(err, overlay.ErrNotFound):
		return fmt.Errorf("address holder: %w", err)
	}
	if *asJSON {
		return printJSON(stdout, v)
	}
	switch {
	case v.BlockHost == "":
		fmt.Fprintf(stdout, "%s: free; its block %s is not claimed by any host\n", a, v.Block)
	case v.Holder == nil:
		fmt.Fprintf(stdout, "%s: free in etcd's copy; its block %s is host %s's (an address given out in the last moment is copied within a second)\n", a, v.Block, v.BlockHost)
	default:
		mac := v.Holder.MAC
		if mac == "" {
			mac = "-"
		}
		fmt.Fprintf(stdout, "%s: held by container %s interface %s (MAC %s) on host %s; block %s\n", a, v.Holder.ContainerID, v.Holder.IfName, mac, v.Holder.Host, v.Block)
	}
	return nil
}
