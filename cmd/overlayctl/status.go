package main

import (
	"cmp"
	"context"
	"encoding/json"
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

	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/overlay"
)

// errFindings is returned by doctor when it found an error: exit code 3.
var errFindings = errors.New("the doctor found problems")

// localTimeout bounds a request to this host's overlayd; the doctor's
// answer takes up to overlayd's own bound (25 s).
const localTimeout = 30 * time.Second

// statusCmd shows this host's status, from its overlayd.
func statusCmd(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the status as JSON")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, localTimeout)
	defer cancel()
	st, err := ctlapi.NewClient(c.socket).Status(ctx)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	if *asJSON {
		return printJSON(stdout, st)
	}
	now := time.Now()
	etcdState := "ok"
	if st.Etcd.Error != "" {
		etcdState = "NOT ANSWERING: " + st.Etcd.Error
	}
	kind := "cluster"
	if st.Etcd.Embedded {
		kind = "embedded"
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "host\t%s\n", st.Host)
	fmt.Fprintf(tw, "overlayd\t%s, up %s\n", st.Version, now.Sub(st.Started).Round(time.Second))
	fmt.Fprintf(tw, "underlay\t%s, VTEP MAC %s\n", st.Underlay, st.VTEPMAC)
	fmt.Fprintf(tw, "etcd\t%s %s: %s\n", kind, strings.Join(st.Etcd.Endpoints, ","), etcdState)
	fmt.Fprintf(tw, "liveness key\t%s\n", map[bool]string{true: "held", false: "LOST (overlayd creates it again once etcd answers)"}[st.Liveness])
	fmt.Fprintf(tw, "gossip\t%s, %d members, %s\n", st.Gossip.Addr, st.Gossip.Members, map[bool]string{true: "encrypted", false: "NOT encrypted"}[st.Gossip.Encrypted])
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(stdout)
	tw = tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NETWORK\tVNI\tCIDR\tSTATE\tBLOCKS\tADDRESSES\tFREE\tPEERS\tFDB\tNEIGH\tROUTES\tLAST PASS\tMESH")
	for _, n := range st.Networks {
		state := "ready"
		switch {
		case !n.Ready:
			state = "NOT READY: " + n.Reason
		case n.Degraded:
			state = "DEGRADED: " + n.Reason
		}
		pass := "never"
		if !n.LastPass.IsZero() {
			pass = ago(now, n.LastPass)
			if n.LastSuccess.Before(n.LastPass) {
				pass += " (failed)"
			}
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n", n.Name, n.VNI, n.CIDR, state, prefixList(n.Blocks),
			n.Addresses, n.Free, n.PeersProgrammed, n.Entries["fdb"], n.Entries["neighbour"], n.Entries["route"], pass, meshText(n.Mesh))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(stdout)
	tw = tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tUNDERLAY\tGOSSIP")
	for _, p := range st.Peers {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", p.Host, p.Underlay, p.Gossip)
	}
	return tw.Flush()
}

// meshText renders a network's peers by the health mesh's state:
// "off" when it is off, else the count of each state, the faults first.
func meshText(m map[string]int) string {
	if m == nil {
		return "off"
	}
	var parts []string
	for _, s := range []struct{ state, word string }{{"unreachable", "UNREACHABLE"}, {"mtu", "MTU TOO SMALL"}, {"reachable", "reachable"}} {
		if m[s.state] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", m[s.state], s.word))
		}
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

// prefixList renders prefixes separated by commas, "-" for none.
func prefixList(ps []netip.Prefix) string {
	if len(ps) == 0 {
		return "-"
	}
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return strings.Join(out, ",")
}

// doctorCmd shows what the doctor found on every host (the reports each
// overlayd stores in etcd), or runs it now on this host (--local).
func doctorCmd(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the reports as JSON")
	local := fs.Bool("local", false, "run the checks now on this host, through its overlayd's socket, instead of reading every host's last report from etcd")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	var reports []ctlapi.Report
	if *local {
		ctx, cancel := context.WithTimeout(ctx, localTimeout)
		defer cancel()
		r, err := ctlapi.NewClient(c.socket).Doctor(ctx)
		if err != nil {
			return fmt.Errorf("doctor: %w", err)
		}
		reports = []ctlapi.Report{r}
	} else {
		var err error
		if reports, err = clusterReports(ctx, c, time.Now()); err != nil {
			return err
		}
	}
	if *asJSON {
		if err := printJSON(stdout, reports); err != nil {
			return err
		}
	} else if err := printReports(stdout, reports); err != nil {
		return err
	}
	for _, r := range reports {
		for _, f := range r.Findings {
			if f.Severity == ctlapi.Error {
				return errFindings
			}
		}
	}
	return nil
}

// clusterReports returns the last report of every host etcd knows of,
// with the findings overlayctl makes itself from etcd: a host whose
// overlayd is down has no fresh report, and says so.
func clusterReports(ctx context.Context, c conn, now time.Time) ([]ctlapi.Report, error) {
	store, closeStore, err := c.store(ctx)
	if err != nil {
		return nil, err
	}
	defer closeStore()
	list, bad := hosts(ctx, store)
	if list == nil && bad != nil {
		return nil, fmt.Errorf("doctor: %w", bad)
	}
	stored, err := store.Reports(ctx)
	if err != nil {
		return nil, fmt.Errorf("doctor: %w", err)
	}
	return reportsOf(list, stored, now), nil
}

// reportsOf is the pure part of clusterReports: one report per host, in
// host order.
func reportsOf(list []hostView, stored map[overlay.HostID][]byte, now time.Time) []ctlapi.Report {
	var out []ctlapi.Report
	for _, h := range list {
		r := ctlapi.Report{Host: h.Host}
		var have bool
		if data, ok := stored[h.Host]; ok {
			have = json.Unmarshal(data, &r) == nil && r.Host == h.Host
			if !have {
				r = ctlapi.Report{Host: h.Host}
			}
		}
		n := 0
		for _, bs := range h.Blocks {
			n += len(bs)
		}
		var extra []ctlapi.Finding
		switch {
		case h.Live == nil && n > 0:
			extra = append(extra, ctlapi.Finding{Severity: ctlapi.Error, Check: "liveness",
				Problem: fmt.Sprintf("no liveness key: its overlayd is stopped or cannot reach etcd, and its %d blocks are not served", n),
				Fix:     fmt.Sprintf("start overlayd on %s, or, if the host is gone for good, free its blocks now with `overlayctl host remove %s` (else they are reclaimed after --reclaim-after)", h.Host, h.Host)})
		case h.Live == nil:
			extra = append(extra, ctlapi.Finding{Severity: ctlapi.Warning, Check: "liveness",
				Problem: "no liveness key: its overlayd is stopped or cannot reach etcd",
				Fix:     fmt.Sprintf("start overlayd on %s, or remove the host with `overlayctl host remove %s`", h.Host, h.Host)})
		case !have:
			extra = append(extra, ctlapi.Finding{Severity: ctlapi.Warning, Check: "doctor",
				Problem: "no report in etcd: its overlayd started less than a minute ago, or is older than this overlayctl",
				Fix:     fmt.Sprintf("run `overlayctl doctor --local` on %s", h.Host)})
		case r.Interval > 0 && now.Sub(r.Checked) > (ctlapi.ReportRefresh+1)*r.Interval+time.Minute:
			extra = append(extra, ctlapi.Finding{Severity: ctlapi.Warning, Check: "doctor",
				Problem: fmt.Sprintf("its report is from %s, older than its overlayd writes them: its doctor has stopped running", ago(now, r.Checked)),
				Fix:     fmt.Sprintf("check overlayd's log on %s; `overlayctl doctor --local` there runs the checks now", h.Host)})
		}
		if h.Record == nil && n > 0 {
			extra = append(extra, ctlapi.Finding{Severity: ctlapi.Error, Check: "registration",
				Problem: fmt.Sprintf("it owns %d blocks but has no host record: no other host routes them", n),
				Fix:     fmt.Sprintf("restart overlayd on %s, which registers it; if the host is gone, `overlayctl host remove %s`", h.Host, h.Host)})
		}
		r.Findings = append(extra, r.Findings...)
		slices.SortStableFunc(r.Findings, func(a, b ctlapi.Finding) int {
			return cmp.Compare(ctlapi.Rank(a.Severity), ctlapi.Rank(b.Severity))
		})
		if r.Findings == nil {
			r.Findings = []ctlapi.Finding{}
		}
		out = append(out, r)
	}
	return out
}

// printReports prints the reports for a person: each host, then its
// findings with their fixes.
func printReports(w io.Writer, reports []ctlapi.Report) error {
	now := time.Now()
	for _, r := range reports {
		count := map[string]int{}
		for _, f := range r.Findings {
			count[f.Severity]++
		}
		when := ""
		if !r.Checked.IsZero() {
			when = ", checked " + ago(now, r.Checked)
		}
		if len(r.Findings) == 0 {
			fmt.Fprintf(w, "host %s: ok%s\n", r.Host, when)
			continue
		}
		var parts []string
		for _, sev := range slices.Sorted(maps.Keys(count)) {
			parts = append(parts, fmt.Sprintf("%d %s", count[sev], plural(sev, count[sev])))
		}
		fmt.Fprintf(w, "host %s: %s%s\n", r.Host, strings.Join(parts, ", "), when)
		for _, f := range r.Findings {
			where := f.Check
			if f.Network != "" {
				where = "network " + f.Network + ", " + f.Check
			}
			fmt.Fprintf(w, "  %-7s [%s] %s\n", f.Severity, where, f.Problem)
			fmt.Fprintf(w, "          fix: %s\n", f.Fix)
		}
	}
	return nil
}

func plural(word string, n int) string {
	if n == 1 {
		return word
	}
	return word + "s"
}

// addressRelease releases a leaked address of this host, through its
// overlayd.
func addressRelease(ctx context.Context, c conn, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("address release", flag.ContinueOnError)
	fs.SetOutput(stderr)
	force := fs.Bool("force", false, "release it even though the container's host veth is still attached (the container is cut off)")
	pos, err := parse(fs, args, 2)
	if err != nil {
		return err
	}
	a, err := netip.ParseAddr(pos[1])
	if err != nil || !a.Is4() {
		return usagef("address release: %q is not an IPv4 address", pos[1])
	}
	ctx, cancel := context.WithTimeout(ctx, localTimeout)
	defer cancel()
	out, err := ctlapi.NewClient(c.socket).Release(ctx, ctlapi.ReleaseRequest{Network: pos[0], Addr: a, Force: *force})
	if err != nil {
		return fmt.Errorf("address release: %w", err)
	}
	veth := "its host veth was already gone"
	if out.VethDeleted {
		veth = "its host veth was deleted"
	}
	fmt.Fprintf(stdout, "released %s of network %s, held by container %s interface %s; %s\n", a, pos[0], out.Key.ContainerID, out.Key.IfName, veth)
	return nil
}
