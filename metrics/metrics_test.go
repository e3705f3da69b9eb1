package metrics

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"

	"github.com/overlaynet/overlay/internal/version"
)

var build = version.Info{Version: "v0.4.0", Revision: "1c39631a2b4e", GoVersion: "go1.26.8"}

func TestBuildInfoAndCNI(t *testing.T) {
	m := New(build)
	m.ObserveCNI("add", "ok", 2*time.Millisecond, 5*time.Millisecond)
	m.ObserveCNI("add", "no_address", time.Millisecond, 0)
	m.ObserveCNI("del", "ok", time.Millisecond, 0)
	want := `
# HELP overlay_build_info Always 1; the labels say which build of overlayd runs.
# TYPE overlay_build_info gauge
overlay_build_info{goversion="go1.26.8",revision="1c39631a2b4e",version="v0.4.0"} 1
# HELP overlay_cni_requests_total CNI socket requests by operation and result (ok, or the kind of CNI error).
# TYPE overlay_cni_requests_total counter
overlay_cni_requests_total{op="add",result="no_address"} 1
overlay_cni_requests_total{op="add",result="ok"} 1
overlay_cni_requests_total{op="del",result="ok"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "overlay_build_info", "overlay_cni_requests_total"); err != nil {
		t.Fatal(err)
	}
	// The answer of all three, the confirmation of the early ADD alone.
	if n := testutil.CollectAndCount(m.cniDuration); n != 2 {
		t.Errorf("%d request duration series, want add and del", n)
	}
	if got := histogramCount(t, m, "overlay_cni_confirmation_duration_seconds"); got != 1 {
		t.Errorf("%d confirmations observed, want the early ADD's", got)
	}
}

// histogramCount returns the sample count of histogram name, summed over
// its series.
func histogramCount(t *testing.T, m *Metrics, name string) uint64 {
	t.Helper()
	mfs := gather(t, m)
	for _, mf := range mfs {
		if mf.GetName() == name {
			var n uint64
			for _, s := range mf.GetMetric() {
				n += s.GetHistogram().GetSampleCount()
			}
			return n
		}
	}
	t.Fatalf("no %s", name)
	return 0
}

func TestHost(t *testing.T) {
	m := New(build)
	stats := HostStats{
		Liveness: true, FirewallWrites: 2, GossipMembers: 2,
		Gossip: GossipTraffic{PacketsSent: 10, BytesSent: 1000, StreamsAccepted: 1, StreamBytesReceived: 300},
		Peers:  map[string]int{"alive": 2, "remembered": 1, "suspect": 1},
	}
	m.Host(func() HostStats { return stats })
	want := `
# HELP overlay_ipam_liveness 1 while this host's liveness key exists in etcd, as far as it knows; 0 while it is being created again.
# TYPE overlay_ipam_liveness gauge
overlay_ipam_liveness 1
# HELP overlay_peers Other hosts registered in etcd by their state in gossip: alive, suspect (alive, but this host's probes got no ack and memberlist has not declared it failed yet), dead (left or failed since this overlayd started), remembered (not heard of since it started). All are programmed from etcd.
# TYPE overlay_peers gauge
overlay_peers{state="alive"} 2
overlay_peers{state="dead"} 0
overlay_peers{state="remembered"} 1
overlay_peers{state="suspect"} 1
# HELP overlay_gossip_bytes_total Bytes of gossip by direction (sent, received) and transport (udp, tcp), encryption included.
# TYPE overlay_gossip_bytes_total counter
overlay_gossip_bytes_total{direction="received",transport="tcp"} 300
overlay_gossip_bytes_total{direction="received",transport="udp"} 0
overlay_gossip_bytes_total{direction="sent",transport="tcp"} 0
overlay_gossip_bytes_total{direction="sent",transport="udp"} 1000
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "overlay_ipam_liveness", "overlay_peers", "overlay_gossip_bytes_total"); err != nil {
		t.Fatal(err)
	}
	// Read at scrape time.
	stats.Liveness = false
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(`
# HELP overlay_ipam_liveness 1 while this host's liveness key exists in etcd, as far as it knows; 0 while it is being created again.
# TYPE overlay_ipam_liveness gauge
overlay_ipam_liveness 0
`), "overlay_ipam_liveness"); err != nil {
		t.Fatal(err)
	}
}

// TestMesh: the health mesh's series, one per pair, counts per network
// by state, and the probes by size and result; none when it is off.
func TestMesh(t *testing.T) {
	m := New(build)
	var mesh *MeshStats
	m.Host(func() HostStats { return HostStats{Mesh: mesh} })
	if n := len(names(t, m)); slices.Contains(names(t, m), "overlay_mesh_probes_total") {
		t.Fatalf("mesh metrics with the mesh off (%d families)", n)
	}
	mesh = &MeshStats{
		Peers: []MeshPeer{
			{Network: "red", Peer: "b", State: "reachable", Reachable: true, MTUOK: true, RTT: 2 * time.Millisecond},
			{Network: "red", Peer: "c", State: "mtu", Reachable: true},
			{Network: "red", Peer: "e", State: "unknown"},
		},
		Probes: map[[2]string]uint64{{"small", "ok"}: 7, {"large", "lost"}: 3},
	}
	want := `
# HELP overlay_mesh_peer_mtu_ok 1 while the peer answers probes of the network's full MTU that may not be fragmented, 0 once two in a row were lost: a path MTU below the overlay's.
# TYPE overlay_mesh_peer_mtu_ok gauge
overlay_mesh_peer_mtu_ok{network="red",peer="b"} 1
overlay_mesh_peer_mtu_ok{network="red",peer="c"} 0
# HELP overlay_mesh_peer_rtt_seconds Round trip of the last small probe the peer answered across the overlay.
# TYPE overlay_mesh_peer_rtt_seconds gauge
overlay_mesh_peer_rtt_seconds{network="red",peer="b"} 0.002
# HELP overlay_mesh_peers Peers of each network by the health mesh's state: reachable, mtu (small probes answered, full-MTU ones lost), unreachable, unknown (no answer yet, and not two probes lost in a row).
# TYPE overlay_mesh_peers gauge
overlay_mesh_peers{network="red",state="mtu"} 1
overlay_mesh_peers{network="red",state="reachable"} 1
overlay_mesh_peers{network="red",state="unknown"} 1
overlay_mesh_peers{network="red",state="unreachable"} 0
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "overlay_mesh_peer_mtu_ok", "overlay_mesh_peer_rtt_seconds", "overlay_mesh_peers"); err != nil {
		t.Fatal(err)
	}
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(`
# HELP overlay_mesh_probes_total Probes the health mesh sent, by size (small, large: the network's MTU) and result (ok, lost, error: not sent).
# TYPE overlay_mesh_probes_total counter
overlay_mesh_probes_total{result="error",size="large"} 0
overlay_mesh_probes_total{result="error",size="small"} 0
overlay_mesh_probes_total{result="lost",size="large"} 3
overlay_mesh_probes_total{result="lost",size="small"} 0
overlay_mesh_probes_total{result="ok",size="large"} 0
overlay_mesh_probes_total{result="ok",size="small"} 7
`), "overlay_mesh_probes_total"); err != nil {
		t.Fatal(err)
	}
}

func TestNetworks(t *testing.T) {
	m := New(build)
	stats := func(blocks int) func() NetworkStats {
		return func() NetworkStats {
			return NetworkStats{
				Blocks:      blocks,
				Entries:     map[string]int{"fdb": 2, "route": 3},
				Added:       map[string]uint64{"fdb": 3},
				Deleted:     map[string]uint64{"fdb": 1},
				LastSuccess: time.Unix(1700000000, 500_000_000),
			}
		}
	}
	red := m.Network("red", stats(1))
	blue := m.Network("blue", stats(2))
	red.ObservePass(3 * time.Millisecond) // before it is registered: kept
	for _, n := range []*Network{red, blue} {
		if err := n.Register(); err != nil {
			t.Fatal(err)
		}
	}
	want := `
# HELP overlay_ipam_blocks Blocks this host allocates from.
# TYPE overlay_ipam_blocks gauge
overlay_ipam_blocks{network="blue"} 2
overlay_ipam_blocks{network="red"} 1
# HELP overlay_reconcile_last_success_timestamp_seconds When the last reconcile pass that succeeded ended, in Unix seconds; 0 before the first.
# TYPE overlay_reconcile_last_success_timestamp_seconds gauge
overlay_reconcile_last_success_timestamp_seconds{network="blue"} 1.7000000005e+09
overlay_reconcile_last_success_timestamp_seconds{network="red"} 1.7000000005e+09
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "overlay_ipam_blocks", "overlay_reconcile_last_success_timestamp_seconds"); err != nil {
		t.Fatal(err)
	}
	entries := gathered(t, m, "overlay_dataplane_entries")
	if len(entries) != 2*len(DataplaneKinds) {
		t.Errorf("%d entry series, want every kind of both networks: %v", len(entries), entries)
	}
	if got := histogramCount(t, m, "overlay_reconcile_pass_duration_seconds"); got == 0 {
		t.Error("the pass observed before Register was lost")
	}

	// A second collector of the same network is refused, not a panic.
	if err := m.Network("red", stats(9)).Register(); err == nil {
		t.Error("a second collector of network red registered")
	}
	red.Unregister()
	if got := gathered(t, m, "overlay_ipam_blocks"); !slices.Equal(got, []string{`network="blue"`}) {
		t.Errorf("after red's Unregister: %v", got)
	}
	// A network created again under the same name registers again.
	if err := m.Network("red", stats(3)).Register(); err != nil {
		t.Fatal(err)
	}
}

// gathered returns the label pairs of each series of name, sorted.
func gathered(t *testing.T, m *Metrics, name string) []string {
	t.Helper()
	mfs := gather(t, m)
	var out []string
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, s := range mf.GetMetric() {
			var pairs []string
			for _, l := range s.GetLabel() {
				pairs = append(pairs, l.GetName()+`="`+l.GetValue()+`"`)
			}
			out = append(out, strings.Join(pairs, ","))
		}
	}
	slices.Sort(out)
	return out
}

// TestLint: every metric follows Prometheus' naming and help conventions,
// as promlint (the linter of promtool check metrics) checks them.
func TestLint(t *testing.T) {
	m := everything(t)
	mfs := gather(t, m)
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	for _, want := range []string{"overlay_build_info", "overlay_ipam_flush_duration_seconds", "overlay_peers", "overlay_gossip_messages_total"} {
		if !names[want] {
			t.Errorf("no %s among %v", want, slices.Sorted(maps.Keys(names)))
		}
	}
}

// everything returns metrics with a series of every metric overlayd has:
// the host's, a network's, the CNI socket's and the etcd client's.
func everything(t *testing.T) *Metrics {
	t.Helper()
	m := New(build)
	m.Host(func() HostStats {
		return HostStats{Mesh: &MeshStats{Peers: []MeshPeer{{Network: "default", Peer: "b", State: "reachable", Reachable: true, MTUOK: true, RTT: time.Millisecond}}}}
	})
	m.EtcdClientOptions()
	invoker := func(context.Context, string, any, any, *grpc.ClientConn, ...grpc.CallOption) error { return nil }
	if err := m.etcd.UnaryClientInterceptor()(t.Context(), "/etcdserverpb.KV/Range", nil, nil, nil, invoker); err != nil {
		t.Fatal(err)
	}
	n := m.Network("default", func() NetworkStats { return NetworkStats{} })
	n.ObservePass(time.Millisecond)
	n.ObserveFlush(time.Millisecond)
	if err := n.Register(); err != nil {
		t.Fatal(err)
	}
	m.ObserveCNI("add", "ok", time.Millisecond, time.Millisecond)
	return m
}

// names returns the names of the overlay_ metric families of m.
func names(t *testing.T, m *Metrics) []string {
	t.Helper()
	mfs := gather(t, m)
	var out []string
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "overlay_") {
			out = append(out, mf.GetName())
		}
	}
	slices.Sort(out)
	return out
}

// metricToken finds metric names in text: overlay_ and what follows.
var metricToken = regexp.MustCompile(`\boverlay_[a-z0-9_]+`)

// TestDocumented: docs/metrics.md has a row for every metric and for no
// other, and every overlay_ name in the docs, the README, the alert rules
// and the dashboard is a metric (or a series of a histogram).
func TestDocumented(t *testing.T) {
	have := names(t, everything(t))
	doc, err := os.ReadFile("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	var rows []string
	for l := range strings.Lines(string(doc)) {
		if name, ok := strings.CutPrefix(l, "| `overlay_"); ok {
			rows = append(rows, "overlay_"+name[:strings.Index(name, "`")])
		}
	}
	slices.Sort(rows)
	if !slices.Equal(rows, have) {
		t.Errorf("docs/metrics.md's tables list\n%v\nthe registry has\n%v", rows, have)
	}

	known := map[string]bool{}
	for _, n := range have {
		known[n] = true
	}
	files, _ := filepath.Glob("../docs/*.md")
	more, _ := filepath.Glob("../deploy/*/*")
	files = append(append(files, more...), "../README.md")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, tok := range metricToken.FindAllString(string(b), -1) {
			base := tok
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if s, ok := strings.CutSuffix(tok, suffix); ok && known[s] {
					base = s
				}
			}
			if !known[base] {
				t.Errorf("%s names %s, which is no metric", f, tok)
			}
		}
	}
}

// TestAlertRules: the alert rules load, and every alert fires on the
// series made up for it and on no others (promtool test rules, from
// Debian's prometheus package, which scripts/lib.sh installs).
func TestAlertRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not found (Debian's prometheus package); scripts/lib.sh installs it")
	}
	for _, args := range [][]string{
		{"check", "rules", "overlay-alerts.yml"},
		{"test", "rules", "overlay-alerts_test.yml"},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "../deploy/prometheus"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// TestDashboard: every query of the Grafana dashboard is PromQL that
// promtool accepts (each made a recording rule, with the dashboard's
// variables given values) and names only metrics overlayd has.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile("../deploy/grafana/overlay.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("deploy/grafana/overlay.json: %v", err)
	}
	known := map[string]bool{}
	for _, n := range names(t, everything(t)) {
		known[n] = true
	}
	vars := strings.NewReplacer("$instance", ".*", "$__rate_interval", "5m")
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	exprs := 0
	for i, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for j, tg := range p.Targets {
			exprs++
			for _, tok := range metricToken.FindAllString(tg.Expr, -1) {
				if s, ok := strings.CutSuffix(tok, "_bucket"); ok {
					tok = s
				}
				if !known[tok] {
					t.Errorf("panel %q queries %s, which is no metric", p.Title, tok)
				}
			}
			q, _ := json.Marshal(vars.Replace(tg.Expr)) // a JSON string is a YAML string
			fmt.Fprintf(&rules, "      - record: dashboard:panel%d_%d\n        expr: %s\n", i, j, q)
		}
	}
	if exprs < 10 {
		t.Fatalf("only %d queries in the dashboard", exprs)
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not found (Debian's prometheus package); scripts/lib.sh installs it")
	}
	f := filepath.Join(t.TempDir(), "dashboard.yml")
	if err := os.WriteFile(f, []byte(rules.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", f).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules on the dashboard's queries: %v\n%s", err, out)
	}
}

// gather returns what a scrape of m would.
func gather(t *testing.T, m *Metrics) []*dto.MetricFamily {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}
