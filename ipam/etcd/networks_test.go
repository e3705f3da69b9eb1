package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/internal/etcdtest"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

func netDef(name, cidr string) overlay.Network {
	return overlay.Network{Name: name, CIDR: netip.MustParsePrefix(cidr), BlockBits: 26, Port: overlay.DefaultPort}
}

func TestCreateNetwork(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(etcdtest.Start(t), "")
	vnis := etcd.VNIRange{First: 100, Last: 101}

	red := netDef("red", "10.1.0.0/16")
	red.Labels = map[string]string{"team": "a"}
	got, err := s.CreateNetwork(ctx, red, vnis)
	if err != nil {
		t.Fatal(err)
	}
	if got.VNI != 100 || len(got.ID) != overlay.IDLen || got.Labels["team"] != "a" {
		t.Fatalf("created %+v: want vni 100, an ID and the label", got)
	}
	blue, err := s.CreateNetwork(ctx, netDef("blue", "10.2.0.0/16"), vnis)
	if err != nil || blue.VNI != 101 || blue.ID == got.ID {
		t.Fatalf("second network: %+v, %v: want vni 101 and its own ID", blue, err)
	}

	for _, c := range []struct {
		name string
		n    overlay.Network
		is   error
		says string
	}{
		{"same name", netDef("red", "10.9.0.0/16"), overlay.ErrConflict, `network "red" exists`},
		{"overlap", netDef("green", "10.1.128.0/17"), overlay.ErrConflict, `overlaps network "red"`},
		{"vni range used up", netDef("green", "10.3.0.0/16"), overlay.ErrPoolExhausted, "every vni of 100-101 is used"},
		{"vni taken", func() overlay.Network { n := netDef("green", "10.3.0.0/16"); n.VNI = 101; return n }(), overlay.ErrConflict, `vni 101 is used by network "blue"`},
		{"bad name", netDef("Bad_Name", "10.3.0.0/16"), overlay.ErrInvalidNetwork, "name"},
		{"long name", netDef("abcdefghijk", "10.3.0.0/16"), overlay.ErrInvalidNetwork, "1 to 10"},
		{"bad label", func() overlay.Network {
			n := netDef("green", "10.3.0.0/16")
			n.Labels = map[string]string{"a=b": "c"}
			return n
		}(), overlay.ErrInvalidNetwork, "label key"},
		{"bad mtu", func() overlay.Network { n := netDef("green", "10.3.0.0/16"); n.MTU = 100; return n }(), overlay.ErrInvalidNetwork, "mtu 100"},
	} {
		_, err := s.CreateNetwork(ctx, c.n, vnis)
		if !errors.Is(err, c.is) || !strings.Contains(err.Error(), c.says) {
			t.Errorf("%s: %v; want %v saying %q", c.name, err, c.is, c.says)
		}
	}
	list, err := s.Networks(ctx)
	if err != nil || len(list) != 2 || list[0].Name != "blue" || list[1].Name != "red" {
		t.Fatalf("Networks = %+v, %v; want blue and red, and nothing half-created", list, err)
	}
}

// Two overlapping networks created at once: exactly one is.
func TestCreateNetworkRace(t *testing.T) {
	ctx := context.Background()
	cli := etcdtest.Start(t)
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := etcd.NewStore(cli, "")
			_, errs[i] = s.CreateNetwork(ctx, netDef(fmt.Sprintf("n%d", i), fmt.Sprintf("10.%d.0.0/16", 10+i%2)), etcd.DefaultVNIRange)
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
		} else if !errors.Is(err, overlay.ErrConflict) {
			t.Errorf("unexpected error: %v", err)
		}
	}
	if ok != 2 {
		t.Fatalf("%d networks created; want 2 (one per address space): %v", ok, errs)
	}
	list, _ := etcd.NewStore(cli, "").Networks(ctx)
	if list[0].VNI == list[1].VNI {
		t.Fatalf("two networks share vni %d", list[0].VNI)
	}
}

func TestDeleteNetwork(t *testing.T) {
	ctx := context.Background()
	cli := etcdtest.Start(t)
	s := etcd.NewStore(cli, "")
	n, err := s.CreateNetwork(ctx, netDef("red", "10.1.0.0/16"), etcd.DefaultVNIRange)
	if err != nil {
		t.Fatal(err)
	}
	p := s.Pool(n, "a")
	b, err := p.Claim(ctx, netip.Prefix{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	al := overlay.Allocation{Key: overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}, Addr: netip.PrefixFrom(overlay.Gateway(b).Next(), b.Bits()), Host: "a"}
	if _, err := p.Mirror(ctx, []overlay.Allocation{al}); err != nil {
		t.Fatal(err)
	}
	use, err := s.DeleteNetwork(ctx, "red", false)
	if !errors.Is(err, etcd.ErrNetworkInUse) || !strings.Contains(err.Error(), "a (1)") || use.Interfaces() != 1 {
		t.Fatalf("delete in use: %v (%v); want it refused, naming host a", err, use)
	}
	if _, err := s.Network(ctx, "red"); err != nil {
		t.Fatalf("a refused deletion removed the network: %v", err)
	}
	if _, err := s.DeleteNetwork(ctx, "red", true); err != nil {
		t.Fatalf("forced delete: %v", err)
	}
	resp, err := cli.Get(ctx, etcd.DefaultPrefix+"networks/red/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || resp.Count != 0 {
		t.Fatalf("keys of the deleted network left: %v, %v", resp, err)
	}
	if _, err := s.Network(ctx, "red"); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("deleted network: %v", err)
	}
	// A host that has not noticed yet cannot claim in it.
	if _, err := s.Pool(n, "b").Claim(ctx, netip.Prefix{}, nil); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("claim in a deleted network: %v; want it refused", err)
	}
	if _, err := p.Mirror(ctx, []overlay.Allocation{al}); !errors.Is(err, etcd.ErrBlockLost) {
		t.Fatalf("mirror into a deleted network: %v; want ErrBlockLost", err)
	}
	if _, err := s.DeleteNetwork(ctx, "red", false); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("deleting twice: %v", err)
	}
	// The name and the address space are free again.
	again, err := s.CreateNetwork(ctx, netDef("red", "10.1.0.0/16"), etcd.DefaultVNIRange)
	if err != nil || again.ID == n.ID {
		t.Fatalf("re-create: %+v, %v; want a new ID", again, err)
	}
}

func TestWatchNetworks(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := etcd.NewStore(etcdtest.Start(t), "")
	seen := make(chan struct{}, 16)
	done := make(chan error, 1)
	go func() { done <- s.WatchNetworks(ctx, func() { seen <- struct{}{} }) }()
	wait := func(what string) {
		t.Helper()
		select {
		case <-seen:
		case <-time.After(5 * time.Second):
			t.Fatalf("no call after %s", what)
		}
	}
	// The watch may start after the creation: retry until it sees one.
	deadline := time.Now().Add(5 * time.Second)
	for i := 0; ; i++ {
		if _, err := s.CreateNetwork(ctx, netDef(fmt.Sprintf("w%d", i), fmt.Sprintf("10.%d.0.0/16", i)), etcd.DefaultVNIRange); err != nil {
			t.Fatal(err)
		}
		select {
		case <-seen:
		case <-time.After(200 * time.Millisecond):
			if time.Now().Before(deadline) {
				continue
			}
			t.Fatal("no call after a creation")
		}
		break
	}
	if _, err := s.DeleteNetwork(ctx, "w0", false); err != nil {
		t.Fatal(err)
	}
	wait("a deletion")
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("WatchNetworks = %v", err)
	}
}

// A network created by an overlayd from before the list of networks is
// listed by the first EnsureNetwork of it.
func TestEnsureListsLegacyNetwork(t *testing.T) {
	ctx := context.Background()
	cli := etcdtest.Start(t)
	n := testNetwork()
	if _, err := cli.Put(ctx, etcd.DefaultPrefix+"networks/default/config", `{"name":"default","cidr":"198.19.0.0/16","blockBits":26,"vni":4096,"port":4789}`); err != nil {
		t.Fatal(err)
	}
	s := etcd.NewStore(cli, "")
	if list, _ := s.Networks(ctx); len(list) != 0 {
		t.Fatalf("listed before: %+v", list)
	}
	if _, err := s.EnsureNetwork(ctx, n); err != nil {
		t.Fatal(err)
	}
	list, err := s.Networks(ctx)
	if err != nil || len(list) != 1 || list[0].Diff(n) != "" {
		t.Fatalf("Networks = %+v, %v; want the legacy network", list, err)
	}
}
