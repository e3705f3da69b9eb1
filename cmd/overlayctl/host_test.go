package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/internal/etcdtest"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// cluster is an etcd with network red, host a (alive, one block with one
// address, a stored doctor report), host b (down, one block) and host c
// (a record, alive, no report).
func cluster(t *testing.T) (ctl, *etcd.Store, netip.Prefix, netip.Prefix, netip.Addr) {
	ctx := context.Background()
	cli := etcdtest.Start(t)
	s := etcd.NewStore(cli, "")
	red, err := s.CreateNetwork(ctx, overlay.Network{Name: "red", CIDR: netip.MustParsePrefix("10.1.0.0/16"), BlockBits: 26, Port: 4789}, etcd.DefaultVNIRange)
	if err != nil {
		t.Fatal(err)
	}
	for i, h := range []overlay.HostID{"a", "b", "c"} {
		if err := s.RegisterHost(ctx, etcd.HostRecord{Host: h, Underlay: netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}), VTEPMAC: "02:00:00:00:00:0" + string(rune('1'+i)), Gossip: "198.18.0.1:7946"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range []overlay.HostID{"a", "c"} {
		if _, err := s.Liveness(h, 0, slog.New(slog.DiscardHandler)).Create(ctx); err != nil {
			t.Fatal(err)
		}
	}
	pa := s.Pool(red, "a")
	ba, err := pa.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bb, err := s.Pool(red, "b").Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	addr := ba[0].Addr().Next().Next()
	al := overlay.Allocation{Key: overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}, Addr: netip.PrefixFrom(addr, 26), Host: "a",
		Endpoint: overlay.Endpoint{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0xc1}}}
	if _, err := pa.Mirror(ctx, []overlay.Allocation{al}); err != nil {
		t.Fatal(err)
	}
	rep, _ := json.Marshal(ctlapi.Report{Host: "a", Checked: time.Now(), Interval: time.Minute, Findings: []ctlapi.Finding{
		{Severity: ctlapi.Warning, Network: "red", Check: "gossip", Problem: "host x: underlay differs", Fix: "restart it"}}})
	if err := s.PutReport(ctx, "a", rep); err != nil {
		t.Fatal(err)
	}
	return ctl{t: t, endpoint: strings.Join(cli.Endpoints(), ",")}, s, ba[0], bb[0], addr
}

func TestHostBlockAddressCommands(t *testing.T) {
	c, s, ba, bb, addr := cluster(t)

	code, out, errs := c.run("host", "list")
	if code != 0 || !regexp.MustCompile(`(?m)^a +198\.18\.0\.1 +alive +1 +up `).MatchString(out) ||
		!regexp.MustCompile(`(?m)^b +198\.18\.0\.2 +down +1 +no liveness key`).MatchString(out) {
		t.Fatalf("host list: %d %q\n%s", code, errs, out)
	}
	var hosts []hostView
	if code, out, _ = c.run("host", "list", "--json"); code != 0 || json.Unmarshal([]byte(out), &hosts) != nil || len(hosts) != 3 || hosts[0].Blocks["red"][0] != ba || hosts[1].Live != nil {
		t.Fatalf("host list --json: %d %s", code, out)
	}

	code, out, _ = c.run("block", "list")
	if code != 0 || !regexp.MustCompile(`red +`+regexp.QuoteMeta(ba.String())+` +a +alive +1 `).MatchString(out) || !regexp.MustCompile(`red +`+regexp.QuoteMeta(bb.String())+` +b +down +0 `).MatchString(out) {
		t.Fatalf("block list: %d\n%s", code, out)
	}
	if code, out, _ = c.run("block", "list", "--host", "b", "--network", "red"); code != 0 || strings.Contains(out, ba.String()) || !strings.Contains(out, bb.String()) {
		t.Fatalf("block list --host b: %d\n%s", code, out)
	}
	if code, _, errs = c.run("block", "list", "--network", "nope"); code != 1 || !strings.Contains(errs, `network "nope" does not exist`) {
		t.Errorf("block list of an unknown network: %d %q", code, errs)
	}

	code, out, _ = c.run("address", "holder", "red", addr.String())
	if code != 0 || !strings.Contains(out, "held by container c1 interface eth0 (MAC 02:00:00:00:00:c1) on host a") {
		t.Fatalf("address holder: %d %q", code, out)
	}
	free := ba.Addr().Next().Next().Next()
	if code, out, _ = c.run("address", "holder", "red", free.String()); code != 0 || !strings.Contains(out, "free in etcd's copy") || !strings.Contains(out, "host a's") {
		t.Errorf("address holder of a free address: %d %q", code, out)
	}
	if code, out, _ = c.run("address", "holder", "red", "10.1.200.9"); code != 0 || !strings.Contains(out, "not claimed by any host") {
		t.Errorf("address holder in an unclaimed block: %d %q", code, out)
	}
	var hv holderView
	if code, out, _ = c.run("address", "holder", "--json", "red", addr.String()); code != 0 || json.Unmarshal([]byte(out), &hv) != nil || hv.BlockHost != "a" || hv.Holder == nil || hv.Holder.ContainerID != "c1" {
		t.Errorf("address holder --json: %d %s", code, out)
	}
	for _, bad := range []struct {
		args []string
		code int
		says string
	}{
		{[]string{"address", "holder", "red", "10.2.0.1"}, 1, "not in network red"},
		{[]string{"address", "holder", "red", "nonsense"}, 2, "not an IPv4 address"},
		{[]string{"address", "holder", "red"}, 2, "want 2 argument"},
		{[]string{"host", "remove", "a"}, 1, "liveness key exists"},
		{[]string{"host", "remove", "nobody"}, 1, "no record and no block"},
		{[]string{"host", "frob"}, 2, "unknown command"},
		{[]string{"frob"}, 2, "status or doctor"},
	} {
		if code, _, errs := c.run(bad.args...); code != bad.code || !strings.Contains(errs, bad.says) {
			t.Errorf("%q: exit %d, %q; want %d saying %q", bad.args, code, errs, bad.code, bad.says)
		}
	}

	// The doctor, from etcd: a's report, b down with a block (an error),
	// c without a report.
	code, out, errs = c.run("doctor")
	if code != 3 {
		t.Fatalf("doctor: exit %d, want 3 (b is down with a block)\n%s%s", code, out, errs)
	}
	for _, want := range []string{
		"host a: 1 warning",
		"[network red, gossip] host x: underlay differs",
		"fix: restart it",
		"host b: 1 error",
		"its 1 blocks are not served",
		"overlayctl host remove b",
		"host c: 1 warning",
		"no report in etcd",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("doctor output lacks %q:\n%s", want, out)
		}
	}
	var reports []ctlapi.Report
	if code, out, _ = c.run("doctor", "--json"); code != 3 || json.Unmarshal([]byte(out), &reports) != nil || len(reports) != 3 || reports[1].Findings[0].Check != "liveness" {
		t.Fatalf("doctor --json: %d %s", code, out)
	}

	// b is gone for good: removed, its block is free, the doctor is
	// content.
	if code, out, errs = c.run("host", "remove", "b"); code != 0 || !strings.Contains(out, "removed host b: 1 blocks freed") {
		t.Fatalf("host remove b: %d %q %q", code, out, errs)
	}
	if blocks, err := s.Blocks(context.Background(), overlay.Network{Name: "red", CIDR: netip.MustParsePrefix("10.1.0.0/16"), BlockBits: 26}); err != nil || len(blocks) != 1 {
		t.Fatalf("blocks after remove: %v %v", blocks, err)
	}
	if code, out, _ = c.run("doctor"); code != 0 || strings.Contains(out, "host b") {
		t.Fatalf("doctor after removing b: %d\n%s", code, out)
	}
}

// TestReportsOf: a stale report and a host that owns blocks without a
// record are findings of overlayctl's own.
func TestReportsOf(t *testing.T) {
	now := time.Now()
	old, _ := json.Marshal(ctlapi.Report{Host: "a", Checked: now.Add(-2 * time.Hour), Interval: 5 * time.Minute, Findings: []ctlapi.Finding{}})
	list := []hostView{
		{HostState: etcd.HostState{Host: "a", Record: &etcd.HostRecord{Host: "a"}, Live: &etcd.LiveRecord{}}},
		{HostState: etcd.HostState{Host: "ghost", Live: &etcd.LiveRecord{}}, Blocks: map[string][]netip.Prefix{"red": {netip.MustParsePrefix("10.1.0.0/26")}}},
	}
	got := reportsOf(list, map[overlay.HostID][]byte{"a": old, "ghost": []byte("{")}, now)
	if len(got) != 2 || len(got[0].Findings) != 1 || !strings.Contains(got[0].Findings[0].Problem, "stopped running") {
		t.Fatalf("a's report: %+v", got)
	}
	var sawRegistration bool
	for _, f := range got[1].Findings {
		sawRegistration = sawRegistration || f.Check == "registration" && f.Severity == ctlapi.Error
	}
	if !sawRegistration {
		t.Errorf("ghost's findings %+v; want a registration error", got[1].Findings)
	}
}

// fakeOverlayd serves ctlapi on a Unix socket and returns its path.
func fakeOverlayd(t *testing.T, h http.Handler) string {
	sock := filepath.Join(t.TempDir(), "overlayd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestLocalCommands(t *testing.T) {
	started := time.Now().Add(-time.Hour)
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ctlapi.StatusPath, func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(ctlapi.Status{Host: "h1", Version: "overlayd test", Started: started, Underlay: netip.MustParseAddr("198.18.0.1"),
			Etcd: ctlapi.EtcdStatus{Embedded: true, Endpoints: []string{"http://127.0.0.1:2379"}}, Liveness: true,
			Gossip: ctlapi.GossipStatus{Addr: "198.18.0.1:7946", Members: 2, Encrypted: true},
			Networks: []ctlapi.NetworkStatus{{Name: "red", VNI: 7100, CIDR: netip.MustParsePrefix("10.1.0.0/16"), Ready: true,
				Blocks: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/26")}, Addresses: 3, Free: 58, PeersProgrammed: 1,
				Entries: map[string]int{"fdb": 1, "neighbour": 1, "route": 1}, LastPass: time.Now(), LastSuccess: time.Now()}},
			Peers: []ctlapi.PeerStatus{{Host: "h2", Underlay: netip.MustParseAddr("198.18.0.2"), Gossip: "alive"}}})
	})
	mux.HandleFunc("POST "+ctlapi.DoctorPath, func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(ctlapi.Report{Host: "h1", Checked: time.Now(), Findings: []ctlapi.Finding{}})
	})
	mux.HandleFunc("POST "+ctlapi.ReleasePath, func(w http.ResponseWriter, r *http.Request) {
		var req ctlapi.ReleaseRequest
		json.NewDecoder(r.Body).Decode(&req)
		if !req.Force {
			w.WriteHeader(http.StatusConflict)
			json.NewEncoder(w).Encode(ctlapi.ErrorBody{Error: "release: its host veth is still attached; use --force"})
			return
		}
		json.NewEncoder(w).Encode(ctlapi.ReleaseResponse{Key: overlay.AttachmentKey{ContainerID: "c9", IfName: "eth0"}, VethDeleted: true})
	})
	sock := fakeOverlayd(t, mux)
	local := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(context.Background(), append([]string{"--socket", sock}, args...), &out, &errb)
		return code, out.String(), errb.String()
	}
	code, out, errs := local("status")
	if code != 0 || !strings.Contains(out, "overlayd test, up 1h0m0s") || !strings.Contains(out, "embedded http://127.0.0.1:2379: ok") ||
		!regexp.MustCompile(`red +7100 +10\.1\.0\.0/16 +ready +10\.1\.0\.0/26 +3 +58 +1 +1 +1 +1 `).MatchString(out) || !regexp.MustCompile(`h2 +198\.18\.0\.2 +alive`).MatchString(out) {
		t.Fatalf("status: %d %q\n%s", code, errs, out)
	}
	var st ctlapi.Status
	if code, out, _ = local("status", "--json"); code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Networks[0].Free != 58 {
		t.Fatalf("status --json: %d %s", code, out)
	}
	if code, out, _ = local("doctor", "--local"); code != 0 || !strings.Contains(out, "host h1: ok") {
		t.Fatalf("doctor --local: %d %q", code, out)
	}
	if code, _, errs = local("address", "release", "red", "10.1.0.9"); code != 1 || !strings.Contains(errs, "use --force") {
		t.Fatalf("release refused: %d %q", code, errs)
	}
	if code, out, _ = local("address", "release", "--force", "red", "10.1.0.9"); code != 0 || !strings.Contains(out, "held by container c9 interface eth0; its host veth was deleted") {
		t.Fatalf("release --force: %d %q", code, out)
	}

	// No overlayd on the socket: a clear error, exit 1.
	var outb, errb bytes.Buffer
	code = run(context.Background(), []string{"--socket", filepath.Join(t.TempDir(), "none.sock"), "status"}, &outb, &errb)
	if code != 1 || !strings.Contains(errb.String(), "overlayd cannot be reached") || !strings.Contains(errb.String(), "is overlayd running?") {
		t.Fatalf("status without overlayd: %d %q", code, errb.String())
	}
}
