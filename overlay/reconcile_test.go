package overlay_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
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

func member(host string, underlay string, blocks ...netip.Prefix) overlay.Member {
	return overlay.Member{
		Host:     overlay.HostID(host),
		Underlay: netip.MustParseAddr(underlay),
		VTEPMAC:  mac("02:00:00:00:00:" + underlay[len(underlay)-1:] + "0"),
		Blocks:   map[string][]netip.Prefix{testNet.Name: blocks},
	}
}

func localA() overlay.Local {
	return overlay.Local{Host: "a", Underlay: netip.MustParseAddr("198.18.0.1"), MTU: 1450, VTEPMAC: mac("02:00:00:00:00:10")}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestDesiredRejectsClaimsEtcdDenies(t *testing.T) {
	owners := map[netip.Prefix]overlay.HostID{blockA: "a", blockB: "b", blockC: "c"}
	alive := []overlay.Member{
		member("b", "198.18.0.2", blockB, blockC), // claims c's block too
		member("d", "198.18.0.4", blockA),         // owns nothing
	}
	cfg, rejected := overlay.Desired(testNet, localA(), owners, alive, nil)
	want := strings.Join([]string{
		"fdb 02:00:00:00:00:20 dst 198.18.0.2",
		"gateway 198.19.0.1/26",
		"neigh 198.18.0.2 lladdr 02:00:00:00:00:20",
		"route 198.19.0.64/26 via 198.18.0.2",
	}, "\n")
	if got := overlaytest.ConfigText(cfg); got != want {
		t.Errorf("desired:\n%s\nwant:\n%s", got, want)
	}
	if len(rejected) != 2 {
		t.Fatalf("rejected = %v, want 2", rejected)
	}
	if rejected[0].Host != "b" || rejected[0].Block != blockC || rejected[0].Owner != "c" {
		t.Errorf("rejected[0] = %+v", rejected[0])
	}
	if rejected[1].Host != "d" || rejected[1].Owner != "a" {
		t.Errorf("rejected[1] = %+v", rejected[1])
	}
}

func TestReconcilerConvergesAndRemovesPeers(t *testing.T) {
	ctx := context.Background()
	store := overlaytest.NewStore(testNet)
	store.SetOwner(blockA, "a")
	store.SetOwner(blockB, "b")
	store.SetOwner(blockC, "c")
	members := &overlaytest.Membership{}
	members.Set(member("b", "198.18.0.2", blockB), member("c", "198.18.0.3", blockC))
	dp := &overlaytest.Dataplane{}
	r := overlay.NewReconciler(testNet, localA(), store, members, dp, time.Hour, discard())

	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if got := dp.Text("default"); strings.Count(got, "route ") != 2 {
		t.Fatalf("after first pass:\n%s", got)
	}

	// c stops gossiping (overlayd restarting) but still owns its block:
	// its entries stay.
	members.Set(member("b", "198.18.0.2", blockB))
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if got := dp.Text("default"); !strings.Contains(got, "route 198.19.0.128/26 via 198.18.0.3") {
		t.Fatalf("a host that is restarting lost its route:\n%s", got)
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

// TestRestartedReconcilerKeepsHostsThatAreDown: a reconciler that starts
// while another host's overlayd is down keeps that host's entries from
// what it remembers, and a live host on the same underlay address wins
// over a remembered one.
func TestRestartedReconcilerKeepsHostsThatAreDown(t *testing.T) {
	ctx := context.Background()
	store := overlaytest.NewStore(testNet)
	store.SetOwner(blockA, "a")
	store.SetOwner(blockB, "b")
	store.SetOwner(blockC, "old")
	dp := &overlaytest.Dataplane{}
	members := &overlaytest.Membership{} // nobody alive on gossip
	r := overlay.NewReconciler(testNet, localA(), store, members, dp, time.Hour, discard())
	r.Remember([]overlay.Member{member("b", "198.18.0.2", blockB), member("old", "198.18.0.3", blockC)})
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if got := dp.Text("default"); !strings.Contains(got, "route 198.19.0.64/26 via 198.18.0.2") || !strings.Contains(got, "via 198.18.0.3") {
		t.Fatalf("remembered hosts not programmed:\n%s", got)
	}

	// A new host takes 198.18.0.3 and gossips: it wins over "old".
	store.SetOwner(netip.MustParsePrefix("198.19.0.192/26"), "new")
	members.Set(member("new", "198.18.0.3", netip.MustParsePrefix("198.19.0.192/26")))
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	got := dp.Text("default")
	if strings.Contains(got, "route 198.19.0.128/26") || !strings.Contains(got, "route 198.19.0.192/26 via 198.18.0.3") {
		t.Fatalf("live host did not win its underlay address:\n%s", got)
	}
}

func TestReconcilerKeepsStateWhileEtcdIsDown(t *testing.T) {
	ctx := context.Background()
	store := overlaytest.NewStore(testNet)
	store.SetOwner(blockA, "a")
	store.SetOwner(blockB, "b")
	members := &overlaytest.Membership{}
	members.Set(member("b", "198.18.0.2", blockB))
	dp := &overlaytest.Dataplane{}
	r := overlay.NewReconciler(testNet, localA(), store, members, dp, time.Hour, discard())
	if err := r.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	before := dp.Text("default")

	outage := errors.New("etcd down")
	store.SetErr(outage)
	if err := r.Pass(ctx); !errors.Is(err, outage) {
		t.Fatalf("Pass during outage = %v, want the outage", err)
	}
	if got := dp.Text("default"); got != before {
		t.Fatalf("outage changed the dataplane:\n%s\nwant:\n%s", got, before)
	}
	if st := r.Status(); st.Failures != 1 || st.Passes != 2 {
		t.Errorf("status = %+v", st)
	}
}

func TestReconcilerNeverProgramsWithoutOwnership(t *testing.T) {
	store := overlaytest.NewStore(testNet)
	store.SetErr(errors.New("etcd down"))
	dp := &overlaytest.Dataplane{}
	r := overlay.NewReconciler(testNet, localA(), store, &overlaytest.Membership{}, dp, time.Hour, discard())
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
	r := overlay.NewReconciler(testNet, localA(), store, &overlaytest.Membership{}, dp, time.Hour, discard())
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
	members.Set(member("b", "198.18.0.2", blockB))
	dp := &overlaytest.Dataplane{}
	owners := &switchOwners{BlockOwners: store}
	r := overlay.NewReconciler(testNet, localA(), owners, members, dp, 200*time.Millisecond, discard())
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
