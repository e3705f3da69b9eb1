package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

func endpointCmd(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("endpoint: want list")
	}
	switch args[0] {
	case "list", "ls":
		return endpointList(ctx, c, args[1:], stdout, stderr)
	}
	return usagef("endpoint: unknown command %q (want list)", args[0])
}

// endpointList lists a network's endpoints as the hosts' mirrors last
// copied them to etcd: address, host, container, interface, MAC address
// and labels. Records that cannot be decoded are reported after the
// list, and make the exit code 1.
func endpointList(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("endpoint list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the endpoints as JSON")
	host := fs.String("host", "", "only the endpoints of this host ID")
	want := labels{}
	fs.Var(want, "label", "KEY=VALUE: only endpoints with this label (repeatable: all of them)")
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
		return fmt.Errorf("endpoint list: %w", err)
	}
	all, err := store.Endpoints(ctx, n)
	if err != nil && !errors.Is(err, etcd.ErrBadRecord) {
		return fmt.Errorf("endpoint list: %w", err)
	}
	bad := err
	eps := []etcd.EndpointRecord{}
	for _, ep := range all {
		if (*host == "" || ep.Host == overlay.HostID(*host)) && hasLabels(ep.Labels, want) {
			eps = append(eps, ep)
		}
	}
	if *asJSON {
		err = printJSON(stdout, eps)
	} else {
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ADDRESS\tHOST\tCONTAINER\tIFNAME\tMAC\tLABELS")
		for _, ep := range eps {
			mac := ep.MAC
			if mac == "" {
				mac = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", ep.Addr, ep.Host, ep.ContainerID, ep.IfName, mac, labelText(ep.Labels))
		}
		err = tw.Flush()
	}
	if err != nil {
		return err
	}
	if bad != nil {
		return fmt.Errorf("endpoint list %s: some records were left out: %w", n.Name, bad)
	}
	return nil
}

// hasLabels reports whether have holds every label of want.
func hasLabels(have, want map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}
