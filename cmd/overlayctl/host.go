package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

func hostCmd(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("host: want list or remove")
	}
	switch args[0] {
	case "list", "ls":
		return hostList(ctx, c, args[1:], stdout, stderr)
	case "remove", "rm":
		return hostRemove(ctx, c, args[1:], stdout, stderr)
	}
	return usagef("host: unknown command %q (want list or remove)", args[0])
}

// hostView is one host as `host list` shows it: what etcd knows of it,
// and the blocks it owns in every network.
type hostView struct {
	etcd.HostState
	// Blocks are the host's blocks, by network.
	Blocks map[string][]netip.Prefix `json:"blocks"`
}

// liveness says in a word whether the host's liveness key exists.
func (h hostView) liveness() string {
	switch {
	case h.Live != nil:
		return "alive"
	case h.Gone != nil:
		return "gone"
	}
	return "down"
}

// note says what the operator may want to know of the host: since when
// it is up or gone, and what a host without a record is.
func (h hostView) note(now time.Time) string {
	var parts []string
	switch {
	case h.Live != nil && !h.Live.Since.IsZero():
		parts = append(parts, "up "+ago(now, h.Live.Since))
	case h.Gone != nil:
		parts = append(parts, fmt.Sprintf("gone %s (noticed by %s); its blocks are reclaimed after overlayd's --reclaim-after, or now with `overlayctl host remove %s`", ago(now, h.Gone.Since), h.Gone.NoticedBy, h.Host))
	case h.Live == nil:
		parts = append(parts, "no liveness key: its overlayd is stopped or cannot reach etcd")
	}
	if h.Record == nil {
		parts = append(parts, "no host record: nobody routes its blocks")
	}
	return strings.Join(parts, "; ")
}

// ago renders how long before now t was, to the second.
func ago(now, t time.Time) string {
	return now.Sub(t).Round(time.Second).String() + " ago"
}

// hosts reads every host etcd knows of, with the blocks each owns: those
// that own blocks but have no record are listed too. Records that cannot
// be decoded are returned in the error, wrapping etcd.ErrBadRecord, next
// to the rest.
func hosts(ctx context.Context, store *etcd.Store) ([]hostView, error) {
	states, bad := store.HostStates(ctx)
	if bad != nil && !errors.Is(bad, etcd.ErrBadRecord) {
		return nil, bad
	}
	nets, err := store.Networks(ctx)
	if err != nil && !errors.Is(err, etcd.ErrBadRecord) {
		return nil, err
	}
	bad = errors.Join(bad, err)
	byHost := make(map[overlay.HostID]*hostView, len(states))
	for _, st := range states {
		byHost[st.Host] = &hostView{HostState: st, Blocks: map[string][]netip.Prefix{}}
	}
	for _, n := range nets {
		blocks, err := store.Blocks(ctx, n)
		if err != nil {
			return nil, err
		}
		for _, b := range blocks {
			v := byHost[b.Host]
			if v == nil {
				v = &hostView{HostState: etcd.HostState{Host: b.Host}, Blocks: map[string][]netip.Prefix{}}
				byHost[b.Host] = v
			}
			v.Blocks[n.Name] = append(v.Blocks[n.Name], b.Block)
		}
	}
	out := make([]hostView, 0, len(byHost))
	for _, id := range slices.Sorted(maps.Keys(byHost)) {
		out = append(out, *byHost[id])
	}
	return out, bad
}

// hostList lists every host with its underlay address, liveness and
// blocks.
func hostList(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("host list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the hosts as JSON")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return err
	}
	defer closeStore()
	list, bad := hosts(ctx, store)
	if list == nil && bad != nil {
		return fmt.Errorf("host list: %w", bad)
	}
	if *asJSON {
		err = printJSON(stdout, list)
	} else {
		now := time.Now()
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "HOST\tUNDERLAY\tLIVENESS\tBLOCKS\tNOTE")
		for _, h := range list {
			underlay := "-"
			if h.Record != nil {
				underlay = h.Record.Underlay.String()
			}
			n := 0
			for _, bs := range h.Blocks {
				n += len(bs)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", h.Host, underlay, h.liveness(), n, h.note(now))
		}
		err = tw.Flush()
	}
	if err != nil {
		return err
	}
	if bad != nil {
		return fmt.Errorf("host list: some records were left out: %w", bad)
	}
	return nil
}

// hostRemove removes a host that is gone for good: its blocks and their
// addresses are freed at once, and every other host removes its routes.
func hostRemove(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("host remove", flag.ContinueOnError)
	fs.SetOutput(stderr)
	pos, err := parse(fs, args, 1)
	if err != nil {
		return err
	}
	id := overlay.HostID(pos[0])
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return err
	}
	defer closeStore()
	removed, err := store.RemoveHost(ctx, id)
	if err != nil {
		return err
	}
	if !removed.Record && len(removed.Blocks) == 0 {
		return fmt.Errorf("host remove %s: etcd has no record and no block of it: check the ID with `overlayctl host list` and --etcd-prefix", id)
	}
	n := 0
	for _, bs := range removed.Blocks {
		n += len(bs)
	}
	fmt.Fprintf(stdout, "removed host %s: %d blocks freed with their addresses; the other hosts remove its routes\n", id, n)
	return nil
}
