package etcd_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// TestEndpoints: the mirror copies an allocation's MAC address and labels
// into its address's record, a label change is copied again, List gives
// them back (as an import after a lost allocation file needs), and
// Endpoints lists every host's, by address, leaving out a record that
// cannot be decoded and saying so.
func TestEndpoints(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	n := testNetwork()
	pa, pb := s.Pool(n, "a"), s.Pool(n, "b")
	ba, err := pa.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bb, err := pb.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	web := alloc("web", netip.PrefixFrom(overlay.Gateway(ba[0]).Next(), ba[0].Bits()).String())
	web.Endpoint = overlay.Endpoint{MAC: net.HardwareAddr{2, 0xaa, 0, 0, 0, 1}, Labels: map[string]string{"app": "web"}}
	old := alloc("old", netip.PrefixFrom(overlay.Gateway(ba[0]).Next().Next(), ba[0].Bits()).String())
	db := overlay.Allocation{Key: overlay.AttachmentKey{ContainerID: "db", IfName: "eth1"}, Addr: netip.PrefixFrom(overlay.Gateway(bb[0]).Next(), bb[0].Bits()), Host: "b",
		Endpoint: overlay.Endpoint{MAC: net.HardwareAddr{2, 0xbb, 0, 0, 0, 1}}}
	if _, err := pa.Mirror(ctx, []overlay.Allocation{web, old}); err != nil {
		t.Fatal(err)
	}
	if _, err := pb.Mirror(ctx, []overlay.Allocation{db}); err != nil {
		t.Fatal(err)
	}

	list, err := pa.List(ctx)
	if err != nil || len(list) != 2 {
		t.Fatalf("List = %v, %v; want web and old", list, err)
	}
	for _, al := range list {
		want := map[string]overlay.Endpoint{"web": web.Endpoint, "old": {}}[al.Key.ContainerID]
		if !al.Endpoint.Equal(want) {
			t.Errorf("List: %s has endpoint %+v; want %+v", al.Key, al.Endpoint, want)
		}
	}

	// A changed label is a changed record.
	web.Endpoint.Labels = map[string]string{"app": "web", "tier": "front"}
	if changed, err := pa.Mirror(ctx, []overlay.Allocation{web, old}); err != nil || changed != 1 {
		t.Fatalf("Mirror after a label change = %d, %v; want 1", changed, err)
	}

	if _, err := s.Client().Put(ctx, etcd.DefaultPrefix+"networks/default/addrs/junk", "x"); err != nil {
		t.Fatal(err)
	}
	eps, err := s.Endpoints(ctx, n)
	if !errors.Is(err, etcd.ErrBadRecord) {
		t.Errorf("Endpoints with a junk key: error %v; want ErrBadRecord", err)
	}
	if len(eps) != 3 {
		t.Fatalf("Endpoints = %+v; want 3", eps)
	}
	got := map[string]etcd.EndpointRecord{}
	for i, ep := range eps {
		got[ep.ContainerID] = ep
		if i > 0 && !eps[i-1].Addr.Addr().Less(ep.Addr.Addr()) {
			t.Errorf("Endpoints not sorted by address: %v before %v", eps[i-1].Addr, ep.Addr)
		}
	}
	if w := got["web"]; w.Addr != web.Addr || w.Host != "a" || w.IfName != "eth0" || w.MAC != "02:aa:00:00:00:01" || w.Labels["tier"] != "front" {
		t.Errorf("web = %+v", w)
	}
	if d := got["db"]; d.Addr != db.Addr || d.Host != "b" || d.IfName != "eth1" || d.MAC != "02:bb:00:00:00:01" || len(d.Labels) != 0 {
		t.Errorf("db = %+v", d)
	}
	if o := got["old"]; o.MAC != "" || !o.Endpoint().IsZero() {
		t.Errorf("old = %+v; want no endpoint", o)
	}
}
