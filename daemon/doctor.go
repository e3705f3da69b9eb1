package daemon

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/gossip"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/firewall"
	"github.com/overlaynet/overlay/overlay/mesh"
	"github.com/overlaynet/overlay/overlay/vxlan"
	"golang.org/x/sync/errgroup"
)

// The doctor compares what this host's kernel holds with what etcd (and,
// for membership, gossip) says it should hold, and names each difference
// with its fix. It reads etcd afresh, not through any cache, and changes
// nothing. docs/troubleshooting.md explains its findings.

// settleTimeout bounds how long the doctor waits for a reconcile pass
// before it checks a network a second time.
const settleTimeout = 3 * time.Second

// firewallSettle is how long the doctor gives the host's convergence
// before it checks the firewall's table a second time.
const firewallSettle = 2 * time.Second

// doctorParallel is how many networks the doctor checks at once.
const doctorParallel = 8

// persisting returns the differences between the kernel and the desired
// state that are still there after a reconcile pass: check runs against
// desired, then, when it found any, settle lets a pass run and both run
// again. A difference that a pass repairs, or that comes from a change in
// etcd the loop had not applied yet, is not a fault. The error is that of
// the last run: what could not be read, beside what could.
func persisting(ctx context.Context, desired func(context.Context) (overlay.DataplaneConfig, error),
	check func(context.Context, overlay.DataplaneConfig) ([]overlay.Difference, error), settle func(context.Context)) ([]overlay.Difference, error) {
	run := func() ([]overlay.Difference, error) {
		cfg, err := desired(ctx)
		if err != nil {
			return nil, err
		}
		return check(ctx, cfg)
	}
	first, err := run()
	if len(first) == 0 {
		return nil, err
	}
	// Differences found beside a failed read are checked again too.
	settle(ctx)
	second, err := run()
	seen := make(map[overlay.Difference]bool, len(first))
	for _, d := range first {
		seen[d] = true
	}
	return slices.DeleteFunc(second, func(d overlay.Difference) bool { return !seen[d] }), err
}

// differenceFinding is the finding of a difference that outlasted a
// reconcile pass on network name; lastErr is the error of the loop's last
// pass, if any.
func differenceFinding(name string, d overlay.Difference, lastErr error) ctlapi.Finding {
	f := ctlapi.Finding{Severity: ctlapi.Error, Network: name, Check: "dataplane", Problem: d.String()}
	why := "overlayd's reconcile pass did not repair it"
	if lastErr != nil {
		why += fmt.Sprintf(" (its last pass failed: %v)", lastErr)
	}
	switch {
	case d.Want == "":
		f.Severity = ctlapi.Warning
		f.Fix = why + ": the entry is for a host or block etcd no longer has, and something on this host keeps adding it back: look for a second overlayd, or another agent (flannel, a script) on the same devices"
	case d.Kind == "device":
		f.Fix = why + ": something on this host changes or removes overlayd's devices behind it (another network agent, a script, NetworkManager managing ov-/ovx- devices); find it and stop it"
	default:
		f.Fix = why + ": the kernel refuses the entry or something removes it; see the errors overlayd logs for network " + name + " (component=reconcile), and look for another agent managing the same device"
	}
	return f
}

// doctor runs the doctor's checks on this host: the host-wide ones, then
// every network's.
// kick asks the host for a convergence of its networks (the firewall's
// rules among them).
func (h *host) doctor(ctx context.Context, nets []network, kick func()) ctlapi.Report {
	down := make(map[overlay.HostID]bool) // hosts without a liveness key
	r := ctlapi.Report{Host: h.id, Checked: time.Now().UTC()}
	add := func(fs ...ctlapi.Finding) { r.Findings = append(r.Findings, fs...) }
	if err := h.ping(ctx); err != nil {
		add(ctlapi.Finding{Severity: ctlapi.Error, Check: "etcd", Problem: err.Error(),
			Fix: "containers keep their connectivity and ADD is served from the blocks this host holds; new blocks, new hosts and network changes wait. Check --etcd-endpoints, etcd's health (etcdctl endpoint health) and the path from this host to it"})
	} else {
		states, err := h.store.HostStates(ctx)
		if err != nil && states == nil {
			add(ctlapi.Finding{Severity: ctlapi.Warning, Check: "gossip", Problem: "cannot list the hosts in etcd: " + err.Error(), Fix: "run the doctor again"})
		}
		add(peerFindings(h.id, states, h.gossip.State)...)
		for _, st := range states {
			if st.Live == nil {
				down[st.Host] = true
			}
		}
		add(h.firewallFindings(ctx, kick)...)
	}
	if !h.live.Alive() {
		add(ctlapi.Finding{Severity: ctlapi.Error, Check: "liveness", Problem: "this host's liveness key is gone from etcd",
			Fix: "overlayd creates it again as soon as etcd answers; if it stays gone for --reclaim-after, the other hosts reclaim this host's blocks"})
	}
	if b, err := os.ReadFile(ipForwardPath); err == nil && strings.TrimSpace(string(b)) != "1" {
		add(ctlapi.Finding{Severity: ctlapi.Error, Check: "forwarding", Problem: "IPv4 forwarding is off (net.ipv4.ip_forward=" + strings.TrimSpace(string(b)) + "): containers cannot reach other hosts",
			Fix: "overlayd turns it on when it starts; something turned it off since. Run `sysctl -w net.ipv4.ip_forward=1` and find the sysctl file or agent that turns it off"})
	}
	if !h.gossip.Encrypted() {
		add(ctlapi.Finding{Severity: ctlapi.Warning, Check: "gossip", Problem: "gossip is not encrypted: any host that reaches the gossip port can join",
			Fix: "give every overlayd the same --gossip-key-file (docs/security.md)"})
	}
	if h.mesh != nil {
		underlay := make(map[overlay.HostID]netip.Addr)
		for _, rec := range h.dir.Records() {
			underlay[rec.Host] = rec.Underlay
		}
		add(meshFindings(h.ul.Addr, h.mesh.States(), underlay, down)...)
	}
	// The networks at once, a few at a time: each may wait for a pass.
	per := make([][]ctlapi.Finding, len(nets))
	var eg errgroup.Group
	eg.SetLimit(doctorParallel)
	for i, n := range nets {
		eg.Go(func() error {
			per[i] = n.Doctor(ctx)
			return nil
		})
	}
	eg.Wait()
	for _, fs := range per {
		add(fs...)
	}
	sortFindings(r.Findings)
	if r.Findings == nil {
		r.Findings = []ctlapi.Finding{}
	}
	return r
}

// sortFindings puts errors first, then host-wide findings, then by
// network and check.
func sortFindings(fs []ctlapi.Finding) {
	slices.SortStableFunc(fs, func(a, b ctlapi.Finding) int {
		return cmp.Or(cmp.Compare(ctlapi.Rank(a.Severity), ctlapi.Rank(b.Severity)), cmp.Compare(a.Network, b.Network), cmp.Compare(a.Check, b.Check))
	})
}

// peerFindings compares, for every other host, what etcd says (its
// liveness key) with what gossip says.
func peerFindings(self overlay.HostID, states []etcd.HostState, gossipState func(overlay.HostID) gossip.State) []ctlapi.Finding {
	var out []ctlapi.Finding
	for _, st := range states {
		if st.Host == self || st.Record == nil {
			continue
		}
		gs := gossipState(st.Host)
		switch {
		case st.Live != nil && gs != gossip.Alive:
			heard := "gossip on this host has not heard from it since overlayd started"
			switch gs {
			case gossip.Departed:
				heard = "gossip on this host marked it failed"
			case gossip.Suspect:
				heard = "gossip on this host suspects it: its probes got no ack"
			}
			out = append(out, ctlapi.Finding{Severity: ctlapi.Warning, Check: "gossip",
				Problem: fmt.Sprintf("host %s is alive in etcd (its liveness key exists) but %s", st.Host, heard),
				Fix:     fmt.Sprintf("traffic to it still flows (the dataplane follows etcd), but changes reach this host only at the next resync. Check that UDP and TCP %s are open from this host to it, and that both use the same --gossip-key-file", st.Record.Gossip)})
		case st.Live == nil && gs == gossip.Alive:
			out = append(out, ctlapi.Finding{Severity: ctlapi.Warning, Check: "liveness",
				Problem: fmt.Sprintf("host %s answers gossip but has no liveness key in etcd: its overlayd cannot reach etcd", st.Host),
				Fix:     fmt.Sprintf("check etcd from host %s (`overlayctl status` there, its --etcd-endpoints and TLS files); if its key stays gone for --reclaim-after, its blocks are reclaimed", st.Host)})
		}
	}
	return out
}

// firewallFindings compares this host's nftables table with the rules of
// the networks in etcd.
// A network created or deleted a moment ago is in etcd before the table:
// a difference is checked again after a convergence (kick).
func (h *host) firewallFindings(ctx context.Context, kick func()) []ctlapi.Finding {
	// A connection of its own: the host's table is not safe for
	// concurrent use, and converge uses it.
	t, err := firewall.New()
	if err != nil {
		return []ctlapi.Finding{{Severity: ctlapi.Warning, Check: "firewall", Problem: "cannot read nftables: " + err.Error(), Fix: "run the doctor as root"}}
	}
	check := func() ([]string, []string, error) {
		defs, err := h.store.Networks(ctx)
		if err != nil && defs == nil {
			return nil, nil, err
		}
		return t.Check(defs)
	}
	missing, stale, err := check()
	if err == nil && len(missing)+len(stale) > 0 {
		kick()
		select {
		case <-ctx.Done():
		case <-time.After(firewallSettle):
		}
		missing2, stale2, err2 := check()
		missing, stale, err = intersect(missing, missing2), intersect(stale, stale2), err2
	}
	if err != nil {
		return []ctlapi.Finding{{Severity: ctlapi.Warning, Check: "firewall", Problem: err.Error(), Fix: "run the doctor again"}}
	}
	var out []ctlapi.Finding
	for _, c := range missing {
		out = append(out, ctlapi.Finding{Severity: ctlapi.Error, Check: "firewall", Problem: fmt.Sprintf("nftables table %s lacks the rule %q", firewall.TableName, c),
			Fix: "overlayd rewrites its table every 10 s; if the rule stays missing, see \"writing the firewall's rules failed\" in its log, and look for a service that flushes the ruleset (`nft flush ruleset`)"})
	}
	for _, c := range stale {
		out = append(out, ctlapi.Finding{Severity: ctlapi.Warning, Check: "firewall", Problem: fmt.Sprintf("nftables table %s holds the rule %q of no network in etcd", firewall.TableName, c),
			Fix: "overlayd removes it within 10 s of the network's deletion; if it stays, see \"writing the firewall's rules failed\" in its log"})
	}
	return out
}

// firstDoctorDelay is how long after start the doctor first runs on its
// own: gossip has joined and the first passes have ended by then.
const firstDoctorDelay = 30 * time.Second

// doctorStats are the counts of the doctor's last periodic run, for the
// metrics.
type doctorStats struct {
	mu       sync.Mutex
	findings map[string]int
	lastRun  time.Time
}

func (d *doctorStats) set(r ctlapi.Report) {
	counts := make(map[string]int)
	for _, f := range r.Findings {
		counts[f.Severity]++
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.findings, d.lastRun = counts, time.Now()
}

func (d *doctorStats) get() (map[string]int, time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return maps.Clone(d.findings), d.lastRun
}

// runDoctor runs the doctor on this host every interval until ctx is
// done. It logs the findings when they change, and stores the report in
// etcd (for overlayctl doctor) when they change or reportRefresh
// intervals after the last write.
func (h *host) runDoctor(ctx context.Context, nets func() []network, kick func(), interval time.Duration) error {
	t := time.NewTimer(min(firstDoctorDelay, interval))
	defer t.Stop()
	var last []ctlapi.Finding
	var written time.Time
	logged := false
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		t.Reset(interval)
		dctx, cancel := context.WithTimeout(ctx, controlTimeout)
		r := h.doctor(dctx, nets(), kick)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.Interval = interval
		h.doctorStats.set(r)
		changed := !logged || !slices.Equal(r.Findings, last)
		if changed {
			logged = true
			if len(r.Findings) == 0 {
				h.log.Info("doctor: no problem found")
			}
			for _, f := range r.Findings {
				lvl := slog.LevelWarn
				if f.Severity == ctlapi.Error {
					lvl = slog.LevelError
				}
				h.log.Log(ctx, lvl, "doctor found a problem", "network", f.Network, "check", f.Check, "problem", f.Problem, "fix", f.Fix)
			}
		}
		if !changed && time.Since(written) < ctlapi.ReportRefresh*interval {
			last = r.Findings
			continue
		}
		data, err := json.Marshal(r)
		if err == nil {
			err = h.store.PutReport(ctx, h.id, data)
		}
		if err != nil {
			h.log.Warn("storing the doctor's report in etcd; overlayctl doctor shows an older one", "err", err)
			last = r.Findings
			continue
		}
		last, written = r.Findings, time.Now()
	}
}

// meshFindings names the pairs the health mesh finds cut or too narrow
// for the overlay's MTU; self is this host's underlay address, underlay
// the peers', and down the hosts without a liveness key, whose pairs are
// a consequence of the host being down (a finding of its own), not of the
// path to it. The text holds no duration, so that a fault that lasts
// gives the same finding run after run.
func meshFindings(self netip.Addr, states []mesh.State, underlay map[overlay.HostID]netip.Addr, down map[overlay.HostID]bool) []ctlapi.Finding {
	var out []ctlapi.Finding
	for _, st := range states {
		peer := underlay[st.Peer]
		since := st.Since.UTC().Format(time.RFC3339)
		word := st.Word()
		switch {
		case word != "unreachable" && word != "mtu":
		case down[st.Peer]:
			out = append(out, ctlapi.Finding{Severity: ctlapi.Warning, Network: st.Network, Check: "mesh",
				Problem: fmt.Sprintf("host %s does not answer across the overlay since %s, and its liveness key is gone: the host or its overlayd is down", st.Peer, since),
				Fix:     fmt.Sprintf("start overlayd on %s; if the host is gone for good, `overlayctl host remove %s`", st.Peer, st.Peer)})
		case word == "unreachable":
			out = append(out, ctlapi.Finding{Severity: ctlapi.Error, Network: st.Network, Check: "mesh",
				Problem: fmt.Sprintf("host %s does not answer across the overlay (its gateway %s) since %s: %s", st.Peer, st.Addr, since, st.Err),
				Fix:     fmt.Sprintf("the VXLAN path between this host (%s) and %s is cut: check that the network's VXLAN UDP port is open both ways between the two underlay addresses, and watch it with `tcpdump -ni <underlay-if> udp port <vxlan-port>` on both; `overlayctl doctor` shows whether %s's own devices are in order", self, peer, st.Peer)})
		default:
			out = append(out, ctlapi.Finding{Severity: ctlapi.Error, Network: st.Network, Check: "mesh",
				Problem: fmt.Sprintf("host %s answers small probes but not full-size ones (%d bytes, not fragmented) since %s: the path to it is narrower than the overlay's MTU", st.Peer, st.MTU, since),
				Fix:     fmt.Sprintf("the underlay between %s and %s must carry %d bytes (the overlay's MTU plus %d of VXLAN): give every host and link the same underlay MTU, or give the network a lower MTU; if the MTU is right, try turning off the NICs' UDP tunnel offloads (`ethtool -K <if> tx-udp_tnl-segmentation off`)", self, peer, st.MTU+vxlan.Overhead, vxlan.Overhead)})
		}
	}
	return out
}

// intersect returns the elements of a that b holds too, in a's order.
func intersect(a, b []string) []string {
	return slices.DeleteFunc(slices.Clone(a), func(s string) bool { return !slices.Contains(b, s) })
}
