package overlay_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/overlaytest"
)

var (
	testNet = overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("198.19.0.0/16"), BlockBits: 26, VNI: 4096, Port: 4789}
	blockA  = netip.MustParsePrefix("198.19.0.0/26")
	blockB  = netip.MustParsePrefix("198.19.0.64/26")
	blockC  = netip.MustParsePrefix("198.19.0.128/26")
)

func mac(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func member(host string, underlay string) overlay.Member {
	return overlay.Member{
		Host:     overlay.HostID(host),
		Underlay: netip.MustParseAddr(underlay),
		VTEPMAC:  mac("02:00:00:00:00:" + underlay[len(underlay)-1:] + "0"),
	}
}

func localA() overlay.Local {
	return overlay.Local{Host: "a", Underlay: netip.MustParseAddr("198.18.0.1"), MTU: 1450, VTEPMAC: mac("02:00:00:00:00:10")}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// record is the host record of the member host would be.
func record(host, underlay string) overlay.HostInfo {
	m := member(host, underlay)
	return overlay.HostInfo{Host: m.Host, Underlay: m.Underlay, VTEPMAC: m.VTEPMAC, Registered: time.Unix(1, 0)}
}

// newStore returns a store where a, b and c own blockA, blockB and blockC
// and have host records at 198.18.0.1, .2 and .3.
func newStore() *overlaytest.Store {
	store := overlaytest.NewStore(testNet)
	for i, h := range []string{"a", "b", "c"} {
		store.SetOwner([]netip.Prefix{blockA, blockB, blockC}[i], overlay.HostID(h))
		store.SetHost(record(h, fmt.Sprintf("198.18.0.%d", i+1)))
	}
	return store
}

// wantBC is the dataplane of a with b and c programmed from their records.
var wantBC = strings.Join([]string{
	"fdb 02:00:00:00:00:20 dst 198.18.0.2",
	"fdb 02:00:00:00:00:30 dst 198.18.0.3",
	"gateway 198.19.0.1/26",
	"neigh 198.18.0.2 lladdr 02:00:00:00:00:20",
	"neigh 198.18.0.3 lladdr 02:00:00:00:00:30",
	"route 198.19.0.128/26 via 198.18.0.3",
	"route 198.19.0.64/26 via 198.18.0.2",
}, "\n")

func desired(t *testing.T, store *overlaytest.Store, alive ...overlay.Member) (string, []overlay.Disagreement) {
	t.Helper()
	owners, err := store.Owners(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	hosts, err := store.Hosts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cfg, d := overlay.Desired(testNet, localA(), owners, hosts, alive)
	return overlaytest.ConfigText(cfg), d
}

// TestDesiredProgramsFromTheStore: every host that owns blocks and has a
// record is a peer, whether gossip says it is alive or not.
func TestDesiredProgramsFromTheStore(t *testing.T) {
	store := newStore()
	for _, alive := range [][]overlay.Member{
		nil, // nobody gossips: overlayd restarting everywhere
		{member("b", "198.18.0.2"), member("c", "198.18.0.3")},
		{member("c", "198.18.0.3")},
	} {
		got, d := desired(t, store, alive...)
		if got != wantBC {
			t.Errorf("alive %v: desired:\n%s\nwant:\n%s", alive, got, wantBC)
		}
		if len(d) != 0 {
			t.Errorf("alive %v: disagreements %v, want none", alive, d)
		}
	}
	// A host without blocks, or without a record, is no peer.
	store.SetOwner(blockC, "")
	store.DeleteHost("b")
	if got, _ := desired(t, store); got != "gateway 198.19.0.1/26" {
		t.Errorf("with c owning nothing and b unregistered:\n%s", got)
	}
}

// TestDesiredIgnoresImpersonation replays what a hostile or confused
// gossip member can say, and checks that no route moves.
func TestDesiredIgnoresImpersonation(t *testing.T) {
	evil := func(host string) overlay.Member {
		m := member(host, "198.18.0.66")
		m.VTEPMAC = mac("02:66:66:66:66:66")
		return m
	}
	store := newStore()
	store.SetOwner(netip.MustParsePrefix("198.19.0.192/26"), "d")
	store.SetHost(record("d", "198.18.0.4"))
	wantBCD := wantBC + "\n" + strings.Join([]string{
		"fdb 02:00:00:00:00:40 dst 198.18.0.4",
		"neigh 198.18.0.4 lladdr 02:00:00:00:00:40",
		"route 198.19.0.192/26 via 198.18.0.4",
	}, "\n")
	wantBCD = sortLines(wantBCD)
	for _, tc := range []struct {
		name  string
		alive []overlay.Member
		want  []string // fields of the disagreements, in order
	}{
		{"takes b's ID from another address", []overlay.Member{evil("b")},
			[]string{"b underlay", "b vtep-mac"}},
		{"registered d gossips b's underlay while b is down",
			[]overlay.Member{member("d", "198.18.0.2")},
			[]string{"d underlay", "d vtep-mac"}},
		{"unregistered member", []overlay.Member{evil("e")}, []string{"e host record"}},
		{"takes this host's ID", []overlay.Member{evil("a")}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, d := desired(t, store, tc.alive...)
			if got != wantBCD {
				t.Errorf("desired:\n%s\nwant:\n%s", got, wantBCD)
			}
			var fields []string
			for _, x := range d {
				fields = append(fields, string(x.Host)+" "+x.Field)
			}
			if !slices.Equal(fields, tc.want) {
				t.Errorf("disagreements %v, want %v", fields, tc.want)
			}
		})
	}
}

// sortLines sorts the lines of a golden text, as ConfigText does.
func sortLines(s string) string {
	lines := strings.Split(s, "\n")
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// TestDesiredUnderlayConflict: of two records on one underlay address the
// later wins, and one on this host's own address is left out.
func TestDesiredUnderlayConflict(t *testing.T) {
	store := newStore()
	blockD := netip.MustParsePrefix("198.19.0.192/26")
	store.SetOwner(blockD, "new")
	reinstalled := record("new", "198.18.0.3")
	reinstalled.Registered = time.Unix(2, 0)
	store.SetHost(reinstalled)
	got, _ := desired(t, store)
	if strings.Contains(got, "route 198.19.0.128/26") || !strings.Contains(got, "route 198.19.0.192/26 via 198.18.0.3") {
		t.Fatalf("the later record did not win its underlay address:\n%s", got)
	}
	stale := record("stale", "198.18.0.1") // this host's address
	store.SetOwner(blockD, "stale")
	store.SetHost(stale)
	if got, _ := desired(t, store); strings.Contains(got, "198.19.0.192/26") {
		t.Fatalf("a record on this host's own underlay address was programmed:\n%s", got)
	}
}

func TestReconcilerConvergesAndRemovesPeers(t *testing.T) {
	ctx := context.Background()
	store := newStore()
	members := &overlaytest.Membership{}
	members.Set(member("b", "198.18.0.2"), member("c", "198.18.0.3"))
	dp := &overlaytest.Dataplane{}
	r := overlay.NewReconciler(testNet, localA(), store, store, members, dp, time.Hour, discard())

	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if got := dp.Text("default"); got != wantBC {
		t.Fatalf("after first pass:\n%s", got)
	}

	// c stops gossiping (overlayd restarting) but still owns its block:
	// its entries stay.
	members.Set(member("b", "198.18.0.2"))
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if got := dp.Text("default"); got != wantBC {
		t.Fatalf("a host that is restarting lost its entries:\n%s", got)
	}

	// c is removed for good: its block is released in etcd.
	store.SetOwner(blockC, "")
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if got := dp.Text("default"); strings.Contains(got, "198.18.0.3") {
		t.Fatalf("removed host still programmed:\n%s", got)
	}
}

// TestReconcilerWarnsOncePerMember: a member whose gossip differs from
// the store is logged and counted once, however many passes see it, and
// again when it differs in a new way.
func TestReconcilerWarnsOncePerMember(t *testing.T) {
	ctx := context.Background()
	store := newStore()
	members := &overlaytest.Membership{}
	var logs strings.Builder
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	r := overlay.NewReconciler(testNet, localA(), store, store, members, &overlaytest.Dataplane{}, time.Hour, log)
	liar := member("b", "198.18.0.9")
	members.Set(liar)
	for range 3 {
		if err := r.Pass(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(logs.String(), "ignoring gossip metadata"); n != 1 {
		t.Fatalf("%d warnings over 3 passes, want 1:\n%s", n, logs.String())
	}
	if st := r.Status(); st.DisagreeingMembers != 1 || len(st.Disagreements) != 2 {
		t.Fatalf("status: %d disagreeing, disagreements %v", st.DisagreeingMembers, st.Disagreements)
	}
	liar.Underlay = netip.MustParseAddr("198.18.0.10")
	members.Set(liar)
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(logs.String(), "level=WARN"); n != 2 || r.Status().DisagreeingMembers != 2 {
		t.Fatalf("a new disagreement: %d warnings, %d counted; want 2 and 2:\n%s", n, r.Status().DisagreeingMembers, logs.String())
	}
	members.Set(member("b", "198.18.0.2"))
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if st := r.Status(); len(st.Disagreements) != 0 {
		t.Fatalf("disagreements %v once the member agrees", st.Disagreements)
	}
}

func TestReconcilerKeepsStateWhileEtcdIsDown(t *testing.T) {
	ctx := context.Background()
	store := overlaytest.NewStore(testNet)
	store.SetOwner(blockA, "a")
	store.SetOwner(blockB, "b")
	members := &overlaytest.Membership{}
	members.Set(member("b", "198.18.0.2"))
	dp := &overlaytest.Dataplane{}
	r := overlay.NewReconciler(testNet, localA(), store, store, members, dp, time.Hour, discard())
	var observed []error
	r.OnPass = func(took time.Duration, err error) {
		if took <= 0 {
			t.Errorf("OnPass told %v", took)
		}
		observed = append(observed, err)
	}
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	before := dp.Text("default")
	good := r.Status().LastSuccess
	if good.IsZero() || !good.Equal(r.Status().LastPass) {
		t.Fatalf("after a good pass: LastSuccess %v, LastPass %v", good, r.Status().LastPass)
	}

	outage := errors.New("etcd down")
	store.SetErr(outage)
	if err := r.Pass(ctx); !errors.Is(err, outage) {
		t.Fatalf("Pass during outage = %v, want the outage", err)
	}
	if got := dp.Text("default"); got != before {
		t.Fatalf("outage changed the dataplane:\n%s\nwant:\n%s", got, before)
	}
	if st := r.Status(); st.Failures != 1 || st.Passes != 2 || !st.LastSuccess.Equal(good) || !st.LastPass.After(good) {
		t.Errorf("status = %+v; want the failed pass after the last success, which stays", st)
	}
	if len(observed) != 2 || observed[0] != nil || !errors.Is(observed[1], outage) {
		t.Errorf("OnPass told %v, want nil then the outage", observed)
	}
}

func TestReconcilerNeverProgramsWithoutOwnership(t *testing.T) {
	store := overlaytest.NewStore(testNet)
	store.SetErr(errors.New("etcd down"))
	dp := &overlaytest.Dataplane{}
	r := overlay.NewReconciler(testNet, localA(), store, store, &overlaytest.Membership{}, dp, time.Hour, discard())
	if err := r.Pass(context.Background()); err == nil {
		t.Fatal("Pass succeeded without ever reading ownership")
	}
	if dp.Sets() != 0 {
		t.Fatalf("dataplane was set %d times without ownership", dp.Sets())
	}
}

func TestReconcilerRunRetriesFailedPass(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	store := overlaytest.NewStore(testNet)
	store.SetOwner(blockA, "a")
	dp := &overlaytest.Dataplane{}
	dp.SetErr(errors.New("netlink busy"))
	r := overlay.NewReconciler(testNet, localA(), store, store, &overlaytest.Membership{}, dp, time.Hour, discard())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()

	deadline := time.Now().Add(5 * time.Second)
	for r.Status().Failures == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no failed pass")
		}
		time.Sleep(10 * time.Millisecond)
	}
	dp.SetErr(nil)
	for dp.Text("default") == "" {
		if time.Now().After(deadline) {
			t.Fatal("failed pass was not retried")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v", err)
	}
}

// hangingOwners blocks like an etcd client whose cluster is unreachable:
// until the context ends.
type hangingOwners struct{ overlay.BlockOwners }

func (hangingOwners) Owners(ctx context.Context) (map[netip.Prefix]overlay.HostID, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestReconcilerDoesNotHangOnUnreachableStore(t *testing.T) {
	ctx := context.Background()
	store := overlaytest.NewStore(testNet)
	store.SetOwner(blockA, "a")
	store.SetOwner(blockB, "b")
	members := &overlaytest.Membership{}
	members.Set(member("b", "198.18.0.2"))
	dp := &overlaytest.Dataplane{}
	owners := &switchOwners{BlockOwners: store}
	r := overlay.NewReconciler(testNet, localA(), owners, store, members, dp, 200*time.Millisecond, discard())
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	before := dp.Text("default")

	owners.BlockOwners = hangingOwners{}
	start := time.Now()
	err := r.Pass(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Pass with a hanging store = %v, want a deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Pass took %s with a hanging store", d)
	}
	if got := dp.Text("default"); got != before {
		t.Fatalf("hanging store changed the dataplane:\n%s", got)
	}
}

type switchOwners struct{ overlay.BlockOwners }
