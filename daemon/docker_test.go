package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/cnm"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/hostlink"
)

// fakeDockerStore is the driver's etcd in memory.
type fakeDockerStore struct {
	mu   sync.Mutex
	nets []overlay.Network
	dnet map[string]string
	deps map[string]etcd.DockerEndpoint
}

func newFakeDockerStore() *fakeDockerStore {
	return &fakeDockerStore{dnet: map[string]string{}, deps: map[string]etcd.DockerEndpoint{}}
}

func (f *fakeDockerStore) Networks(context.Context) ([]overlay.Network, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]overlay.Network(nil), f.nets...), nil
}
func (f *fakeDockerStore) Network(_ context.Context, name string) (overlay.Network, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, n := range f.nets {
		if n.Name == name {
			return n, nil
		}
	}
	return overlay.Network{}, fmt.Errorf("network %q does not exist: %w", name, overlay.ErrNotFound)
}
func (f *fakeDockerStore) CreateNetwork(_ context.Context, n overlay.Network, _ etcd.VNIRange) (overlay.Network, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n.VNI == 0 {
		n.VNI = 7100 + uint32(len(f.nets))
	}
	f.nets = append(f.nets, n)
	return n, nil
}
func (f *fakeDockerStore) key(h overlay.HostID, id string) string { return string(h) + "/" + id }
func (f *fakeDockerStore) PutDockerNetwork(_ context.Context, h overlay.HostID, id, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dnet[f.key(h, id)] = name
	return nil
}
func (f *fakeDockerStore) DockerNetwork(_ context.Context, h overlay.HostID, id string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	name, ok := f.dnet[f.key(h, id)]
	if !ok {
		return "", overlay.ErrNotFound
	}
	return name, nil
}
func (f *fakeDockerStore) DeleteDockerNetwork(_ context.Context, h overlay.HostID, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.dnet, f.key(h, id))
	return nil
}
func (f *fakeDockerStore) PutDockerEndpoint(_ context.Context, h overlay.HostID, id string, ep etcd.DockerEndpoint) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deps[f.key(h, id)] = ep
	return nil
}
func (f *fakeDockerStore) DockerEndpoint(_ context.Context, h overlay.HostID, id string) (etcd.DockerEndpoint, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ep, ok := f.deps[f.key(h, id)]
	if !ok {
		return ep, overlay.ErrNotFound
	}
	return ep, nil
}
func (f *fakeDockerStore) DockerEndpoints(_ context.Context, h overlay.HostID) (map[string]etcd.DockerEndpoint, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]etcd.DockerEndpoint{}
	for k, ep := range f.deps {
		if id, ok := strings.CutPrefix(k, string(h)+"/"); ok {
			out[id] = ep
		}
	}
	return out, nil
}
func (f *fakeDockerStore) DeleteDockerEndpoint(_ context.Context, h overlay.HostID, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.deps, f.key(h, id))
	return nil
}

// fakeDockerService hands out the addresses of block 10.30.0.0/26 in
// order.
type fakeDockerService struct {
	mu     sync.Mutex
	allocs map[overlay.AttachmentKey]overlay.Allocation
}

var dockerBlock = netip.MustParsePrefix("10.30.0.0/26")

func (f *fakeDockerService) Allocate(_ context.Context, r attach.Request) (attach.Attachment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	al, ok := f.allocs[r.Key]
	if !ok {
		a := dockerBlock.Addr().Next().Next()
		if r.IP.IsValid() {
			a = r.IP
		}
		for taken := true; taken; {
			taken = false
			for _, o := range f.allocs {
				if o.Addr.Addr() == a {
					if r.IP.IsValid() {
						return attach.Attachment{}, &attach.Error{Kind: attach.NoAddress, Msg: "taken"}
					}
					a, taken = a.Next(), true
				}
			}
		}
		al = overlay.Allocation{Key: r.Key, Addr: netip.PrefixFrom(a, 26), Endpoint: r.Endpoint}
		f.allocs[r.Key] = al
	}
	return attach.Attachment{Network: r.Network, Addr: al.Addr, Gateway: overlay.Gateway(dockerBlock), MTU: 1450, Bridge: "ovbr-" + r.Network, MAC: al.Endpoint.MAC}, nil
}
func (f *fakeDockerService) Flush(context.Context, string) error { return nil }
func (f *fakeDockerService) Detach(_ context.Context, r attach.Request) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.allocs, r.Key)
	return nil
}
func (f *fakeDockerService) Allocations(context.Context, string) ([]overlay.Allocation, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []overlay.Allocation
	for _, al := range f.allocs {
		out = append(out, al)
	}
	return out, nil
}
func (f *fakeDockerService) Holder(_ context.Context, _ string, a netip.Addr) (overlay.Allocation, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, al := range f.allocs {
		if al.Addr.Addr() == a {
			return al, nil
		}
	}
	return overlay.Allocation{}, &attach.Error{Kind: attach.NotFound, Msg: "nobody holds " + a.String()}
}

// fakeDockerLinks records the veth pairs.
type fakeDockerLinks struct {
	mu    sync.Mutex
	veths map[string]hostlink.Veth
}

func (f *fakeDockerLinks) AddVeth(v hostlink.Veth) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.veths[v.HostName]; ok {
		return fmt.Errorf("%s exists", v.HostName)
	}
	f.veths[v.HostName] = v
	return nil
}
func (f *fakeDockerLinks) Delete(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.veths, name)
	return nil
}
func (f *fakeDockerLinks) State(name string) (hostlink.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.veths[name]; ok {
		return hostlink.Attached, nil
	}
	return hostlink.Gone, nil
}
func (f *fakeDockerLinks) IfIndex(name string) (int, error) {
	if strings.HasPrefix(name, "ovbr-") {
		return 7, nil
	}
	return 0, fmt.Errorf("no link %s", name)
}

func newDockerBackend(host overlay.HostID, store dockerStore, routes ...netip.Prefix) (*dockerBackend, *fakeDockerService, *fakeDockerLinks) {
	svc := &fakeDockerService{allocs: map[overlay.AttachmentKey]overlay.Allocation{}}
	links := &fakeDockerLinks{veths: map[string]hostlink.Veth{}}
	return &dockerBackend{host: host, store: store, svc: svc, links: links, log: slog.New(slog.DiscardHandler), nets: map[string]string{},
		routes: func() ([]netip.Prefix, error) { return routes, nil }}, svc, links
}

// TestDockerLifecycle: the calls dockerd 20.10 makes, in its order
// (measured; see package cnm), from docker network create to docker
// network rm, on a host that creates the network and on another that
// joins it.
func TestDockerLifecycle(t *testing.T) {
	ctx := context.Background()
	store := newFakeDockerStore()
	b, svc, links := newDockerBackend("a", store)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	pool, err := b.RequestPool(ctx, cnm.RequestPoolRequest{AddressSpace: cnm.GlobalAddressSpace, Pool: "10.30.0.0/16"})
	must(err)
	if pool.PoolID != "10.30.0.0/16" || pool.Pool != "10.30.0.0/16" {
		t.Fatalf("RequestPool = %+v", pool)
	}
	gw, err := b.RequestAddress(ctx, cnm.RequestAddressRequest{PoolID: pool.PoolID, Options: map[string]string{cnm.RequestAddressTypeOption: cnm.GatewayAddressType}})
	must(err)
	if gw.Address != "10.30.0.1/16" || len(svc.allocs) != 0 {
		t.Fatalf("gateway = %+v, allocations %v; want the pool's first address, reserving nothing", gw, svc.allocs)
	}
	netID := "666f51ee110d9ec54593393875ab6921e7d75387af61caca13e7b3a635b5ce27"
	must(b.CreateNetwork(ctx, cnm.CreateNetworkRequest{NetworkID: netID,
		Options:  map[string]any{"com.docker.network.enable_ipv6": false, cnm.GenericOption: map[string]any{"name": "red", "vni": "4242", "label.team": "web"}},
		IPv4Data: []cnm.IPAMData{{AddressSpace: "overlay", Pool: "10.30.0.0/16", Gateway: gw.Address}}}))
	red, err := store.Network(ctx, "red")
	if err != nil || red.CIDR != netip.MustParsePrefix("10.30.0.0/16") || red.VNI != 4242 || red.Labels["team"] != "web" || len(red.Labels) != 1 {
		t.Fatalf("the overlay network created: %+v, %v", red, err)
	}

	addr, err := b.RequestAddress(ctx, cnm.RequestAddressRequest{PoolID: pool.PoolID})
	must(err)
	if addr.Address != "10.30.0.2/26" {
		t.Fatalf("RequestAddress = %+v, want the first of this host's block, with its prefix length", addr)
	}
	epID := "35c97caf6b91f49aabda81fcc6b7c2febd77b7f4b55ee377b4e719b8f3b70604"
	ce, err := b.CreateEndpoint(ctx, cnm.CreateEndpointRequest{NetworkID: netID, EndpointID: epID, Interface: &cnm.EndpointInterface{Address: addr.Address}})
	must(err)
	if ce.Interface == nil || ce.Interface.MacAddress == "" {
		t.Fatalf("CreateEndpoint = %+v; want the endpoint's MAC address", ce)
	}
	join, err := b.Join(ctx, cnm.JoinRequest{NetworkID: netID, EndpointID: epID, SandboxKey: "/var/run/docker/netns/x"})
	must(err)
	if join.InterfaceName.SrcName != "ovd35c97caf6b9" || join.InterfaceName.DstPrefix != "eth" || join.Gateway != "10.30.0.1" {
		t.Fatalf("Join = %+v", join)
	}
	var veth hostlink.Veth
	for _, v := range links.veths {
		veth = v
	}
	if len(links.veths) != 1 || veth.PeerName != join.InterfaceName.SrcName || veth.Master != 7 || veth.MTU != 1450 || veth.PeerMAC.String() != ce.Interface.MacAddress ||
		!strings.HasPrefix(veth.HostName, overlay.HostVethPrefix) {
		t.Fatalf("veth %+v", links.veths)
	}
	info, err := b.EndpointOperInfo(ctx, cnm.EndpointRequest{NetworkID: netID, EndpointID: epID})
	if err != nil || info.Value["address"] != "10.30.0.2/26" || info.Value["host"] != "a" {
		t.Fatalf("EndpointOperInfo = %+v, %v", info, err)
	}
	must(b.ProgramExternalConnectivity(ctx, cnm.ProgramExternalConnectivityRequest{NetworkID: netID, EndpointID: epID,
		Options: map[string]any{"com.docker.network.portmap": []any{}}}))
	if err := b.ProgramExternalConnectivity(ctx, cnm.ProgramExternalConnectivityRequest{NetworkID: netID, EndpointID: epID,
		Options: map[string]any{"com.docker.network.portmap": []any{map[string]any{"HostPort": 80.0}}}}); err == nil || !strings.Contains(err.Error(), "docker run -p") {
		t.Fatalf("a published port: %v", err)
	}

	// Another host's dockerd creates the network too: it is red, and an
	// option that differs from red's is refused.
	b2, _, _ := newDockerBackend("b", store)
	if err := b2.CreateNetwork(ctx, cnm.CreateNetworkRequest{NetworkID: "n2", Options: map[string]any{cnm.GenericOption: map[string]any{"vni": "9"}},
		IPv4Data: []cnm.IPAMData{{Pool: "10.30.0.0/16"}}}); err == nil || !strings.Contains(err.Error(), "vni 4242") {
		t.Fatalf("a vni that differs: %v", err)
	}
	if err := b2.CreateNetwork(ctx, cnm.CreateNetworkRequest{NetworkID: "n2", Options: map[string]any{cnm.GenericOption: map[string]any{"label.team": "db", "label.tier": "1"}},
		IPv4Data: []cnm.IPAMData{{Pool: "10.30.0.0/16"}}}); err == nil || !strings.Contains(err.Error(), "label team=web, no label tier") {
		t.Fatalf("labels that differ: %v", err)
	}
	must(b2.CreateNetwork(ctx, cnm.CreateNetworkRequest{NetworkID: "n2", Options: map[string]any{cnm.GenericOption: map[string]any{"label.team": "web"}},
		IPv4Data: []cnm.IPAMData{{Pool: "10.30.0.0/16"}}}))
	if name, _ := store.DockerNetwork(ctx, "b", "n2"); name != "red" || len(store.nets) != 1 {
		t.Fatalf("host b's network is %q (%d overlay networks); want red", name, len(store.nets))
	}

	// overlayd restarts (a new backend, nothing in memory): the endpoint
	// is found in etcd.
	b, _, _ = newDockerBackend("a", store)
	b.svc, b.links = svc, links
	must(b.Leave(ctx, cnm.EndpointRequest{NetworkID: netID, EndpointID: epID}))
	if len(links.veths) != 0 {
		t.Fatalf("veths left after Leave: %v", links.veths)
	}
	must(b.DeleteEndpoint(ctx, cnm.EndpointRequest{NetworkID: netID, EndpointID: epID}))
	if _, err := store.DockerEndpoint(ctx, "a", epID); err == nil {
		t.Fatal("the endpoint's record outlives DeleteEndpoint")
	}
	must(b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: pool.PoolID, Address: "10.30.0.2"}))
	must(b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: pool.PoolID, Address: "10.30.0.1"}))
	must(b.ReleasePool(ctx, cnm.ReleasePoolRequest{PoolID: pool.PoolID}))
	must(b.DeleteNetwork(ctx, cnm.NetworkRequest{NetworkID: netID}))
	if len(svc.allocs) != 0 {
		t.Fatalf("addresses left: %v", svc.allocs)
	}
	if _, err := store.DockerNetwork(ctx, "a", netID); err == nil {
		t.Fatal("the Docker network's record outlives DeleteNetwork")
	}
	if _, err := store.Network(ctx, "red"); err != nil {
		t.Fatalf("the overlay network went with one dockerd's network: %v", err)
	}
}

// TestDockerPools: --ipam-opt network=NAME, a subnet that overlaps a
// network, unknown options, and a pool chosen clear of networks and the
// host's routes.
func TestDockerPools(t *testing.T) {
	ctx := context.Background()
	store := newFakeDockerStore()
	store.nets = []overlay.Network{{Name: "red", CIDR: netip.MustParsePrefix("10.30.0.0/16")}, {Name: "blue", CIDR: netip.MustParsePrefix("10.129.0.0/16")}}
	b, _, _ := newDockerBackend("a", store, netip.MustParsePrefix("10.128.0.0/24"), netip.MustParsePrefix("0.0.0.0/0"))
	if p, err := b.RequestPool(ctx, cnm.RequestPoolRequest{Pool: "10.30.0.0/16", Options: map[string]string{"network": "red"}}); err != nil || p.Pool != "10.30.0.0/16" {
		t.Errorf("--ipam-opt network=red --subnet 10.30.0.0/16: %+v, %v", p, err)
	}
	if p, err := b.RequestPool(ctx, cnm.RequestPoolRequest{}); err != nil || p.Pool != "10.130.0.0/16" {
		t.Errorf("a chosen pool: %+v, %v; want 10.130.0.0/16, clear of a route and of blue", p, err)
	}
	for _, c := range []struct {
		r    cnm.RequestPoolRequest
		says string
	}{
		{cnm.RequestPoolRequest{Pool: "10.30.5.0/24"}, "overlaps network red"},
		{cnm.RequestPoolRequest{Pool: "10.30.0.0"}, "not an IPv4 subnet"},
		{cnm.RequestPoolRequest{Options: map[string]string{"network": "green"}}, "no such overlay network"},
		{cnm.RequestPoolRequest{Options: map[string]string{"network": "red"}}, "give --subnet 10.30.0.0/16 too"},
		{cnm.RequestPoolRequest{Options: map[string]string{"network": "red"}, Pool: "10.31.0.0/16"}, "differs from network red's"},
		{cnm.RequestPoolRequest{Options: map[string]string{"flavour": "x"}}, `unknown --ipam-opt "flavour"`},
		{cnm.RequestPoolRequest{V6: true}, "IPv6"},
		{cnm.RequestPoolRequest{Pool: "10.40.0.0/16", SubPool: "10.40.1.0/24"}, "--ip-range"},
	} {
		if _, err := b.RequestPool(ctx, c.r); err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("RequestPool(%+v) = %v; want it refused saying %q", c.r, err, c.says)
		}
	}
	if err := b.CreateNetwork(ctx, cnm.CreateNetworkRequest{NetworkID: "n", Options: map[string]any{cnm.GenericOption: map[string]any{"colour": "x"}},
		IPv4Data: []cnm.IPAMData{{Pool: "10.50.0.0/16"}}}); err == nil || !strings.Contains(err.Error(), `unknown --opt "colour"`) {
		t.Errorf("an unknown --opt: %v", err)
	}
	if err := b.CreateNetwork(ctx, cnm.CreateNetworkRequest{NetworkID: "n", IPv4Data: []cnm.IPAMData{{Pool: "10.50.0.0/16", AuxAddresses: map[string]any{"x": "10.50.0.9"}}}}); err == nil || !strings.Contains(err.Error(), "--aux-address") {
		t.Errorf("an aux address: %v", err)
	}
	if _, err := b.CreateEndpoint(ctx, cnm.CreateEndpointRequest{NetworkID: "never-created", EndpointID: "e", Interface: &cnm.EndpointInterface{Address: "10.30.0.9/26"}}); err == nil || !strings.Contains(err.Error(), "not one of this driver's") {
		t.Errorf("an endpoint of an unknown network: %v", err)
	}
	if _, err := b.RequestAddress(ctx, cnm.RequestAddressRequest{PoolID: "10.60.0.0/16"}); err == nil || !strings.Contains(err.Error(), "no overlay network has the subnet") {
		t.Errorf("an address of a pool no network has: %v", err)
	}
}

// TestDockerUnknown: requests for a network or endpoint the driver does
// not know, or refused, say so and leave nothing behind.
func TestDockerUnknown(t *testing.T) {
	ctx := context.Background()
	store := newFakeDockerStore()
	store.nets = []overlay.Network{{Name: "red", CIDR: netip.MustParsePrefix("10.30.0.0/16")}}
	b, svc, links := newDockerBackend("a", store)
	for name, err := range map[string]error{
		"Join": func() error { _, err := b.Join(ctx, cnm.JoinRequest{NetworkID: "n", EndpointID: "e"}); return err }(),
		"EndpointOperInfo": func() error {
			_, err := b.EndpointOperInfo(ctx, cnm.EndpointRequest{NetworkID: "n", EndpointID: "e"})
			return err
		}(),
	} {
		if err == nil || !strings.Contains(err.Error(), "endpoint e is not one of this driver's") {
			t.Errorf("%s of an unknown endpoint: %v", name, err)
		}
	}
	// Undoing what is not there is no error: dockerd cleans up after
	// failures with these.
	for name, err := range map[string]error{
		"Leave":          b.Leave(ctx, cnm.EndpointRequest{NetworkID: "n", EndpointID: "e"}),
		"DeleteEndpoint": b.DeleteEndpoint(ctx, cnm.EndpointRequest{NetworkID: "n", EndpointID: "e"}),
		"ReleaseAddress": b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: "10.30.0.0/16", Address: "10.30.0.9"}),
		"DeleteNetwork":  b.DeleteNetwork(ctx, cnm.NetworkRequest{NetworkID: "n"}),
	} {
		if err != nil {
			t.Errorf("%s of an unknown endpoint or network: %v", name, err)
		}
	}
	if err := b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: "10.60.0.0/16", Address: "10.60.0.9"}); err == nil || !strings.Contains(err.Error(), "no overlay network has the subnet 10.60.0.0/16") {
		t.Errorf("a release in a pool no network has: %v", err)
	}
	// A refused creation writes nothing: no overlay network, no mapping.
	for _, r := range []cnm.CreateNetworkRequest{
		{NetworkID: "n1", Options: map[string]any{cnm.GenericOption: map[string]any{"vni": "x"}}, IPv4Data: []cnm.IPAMData{{Pool: "10.50.0.0/16"}}},
		{NetworkID: "n2", Options: map[string]any{cnm.GenericOption: map[string]any{"name": "blue"}}, IPv4Data: []cnm.IPAMData{{Pool: "10.30.0.0/16"}}},
		{NetworkID: "n3", IPv4Data: []cnm.IPAMData{{Pool: "10.50.0.0/16"}, {Pool: "10.51.0.0/16"}}},
		{NetworkID: "n4", IPv4Data: []cnm.IPAMData{{Pool: "10.50.0.0/16"}}, IPv6Data: []cnm.IPAMData{{Pool: "fd00::/64"}}},
		{NetworkID: "n5", Options: map[string]any{cnm.GenericOption: map[string]any{"label.": "x"}}, IPv4Data: []cnm.IPAMData{{Pool: "10.50.0.0/16"}}},
	} {
		if err := b.CreateNetwork(ctx, r); err == nil {
			t.Errorf("CreateNetwork(%+v) succeeded", r)
		}
	}
	if len(store.nets) != 1 || len(store.dnet) != 0 || len(svc.allocs) != 0 || len(links.veths) != 0 {
		t.Fatalf("refused requests left networks %v, mappings %v, addresses %v, veths %v", store.nets, store.dnet, svc.allocs, links.veths)
	}
}

// TestDockerLeftovers: an address dockerd was given and never wired (it
// crashed between RequestAddress and Join), or an endpoint whose veth
// went while dockerd was down, is released by the second sweep that
// finds it so; a late release from dockerd of an address given again
// since does not take it from its new holder.
func TestDockerLeftovers(t *testing.T) {
	ctx := context.Background()
	store := newFakeDockerStore()
	store.nets = []overlay.Network{{Name: "red", CIDR: netip.MustParsePrefix("10.30.0.0/16")}}
	b, svc, links := newDockerBackend("a", store)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := b.CreateNetwork(ctx, cnm.CreateNetworkRequest{NetworkID: "n", IPv4Data: []cnm.IPAMData{{Pool: "10.30.0.0/16"}}}); err != nil {
		t.Fatal(err)
	}
	// run starts a container as dockerd does and returns its address.
	run := func(ep string) string {
		t.Helper()
		a, err := b.RequestAddress(ctx, cnm.RequestAddressRequest{PoolID: "10.30.0.0/16"})
		must(err)
		_, err = b.CreateEndpoint(ctx, cnm.CreateEndpointRequest{NetworkID: "n", EndpointID: ep, Interface: &cnm.EndpointInterface{Address: a.Address}})
		must(err)
		_, err = b.Join(ctx, cnm.JoinRequest{NetworkID: "n", EndpointID: ep})
		must(err)
		return a.Address
	}
	running := run("e-running")
	vanished := run("e-vanished")
	never, err := b.RequestAddress(ctx, cnm.RequestAddressRequest{PoolID: "10.30.0.0/16"}) // dockerd crashed here
	must(err)
	cni := overlay.AttachmentKey{ContainerID: "cni1", IfName: "eth0"}
	if _, err := svc.Allocate(ctx, attach.Request{Network: "red", Key: cni}); err != nil {
		t.Fatal(err)
	}
	ep, _ := store.DockerEndpoint(ctx, "a", "e-vanished")
	must(links.Delete(overlay.HostVethName("red", ep.Key))) // the container went while dockerd was down

	holders := func() []string {
		var out []string
		for _, al := range svc.allocs {
			out = append(out, al.Addr.String())
		}
		slices.Sort(out)
		return out
	}
	must(b.sweep(ctx, []string{"red"}))
	if len(svc.allocs) != 4 {
		t.Fatalf("the first sweep released %v; want nothing released before a second look", holders())
	}
	must(b.sweep(ctx, []string{"red"}))
	want := []string{running, "10.30.0.5/26"} // and the CNI container's
	if got := holders(); !slices.Equal(got, want) || svc.allocs[cni].Addr.String() != "10.30.0.5/26" {
		t.Fatalf("after two sweeps the addresses held are %v; want %v (never-wired %s and vanished %s released)", got, want, never.Address, vanished)
	}
	if _, err := store.DockerEndpoint(ctx, "a", "e-vanished"); err == nil {
		t.Fatal("the vanished endpoint's record outlives its collection")
	}
	if _, err := store.DockerEndpoint(ctx, "a", "e-running"); err != nil {
		t.Fatalf("the running endpoint's record: %v", err)
	}

	// The vanished address is given again; dockerd comes back and cleans
	// up the endpoint it remembers: its late release is left alone.
	again := run("e-new")
	if again != vanished && again != never.Address {
		t.Fatalf("the new container got %s; the test wants a released address given again", again)
	}
	must(b.Leave(ctx, cnm.EndpointRequest{NetworkID: "n", EndpointID: "e-vanished"}))
	must(b.DeleteEndpoint(ctx, cnm.EndpointRequest{NetworkID: "n", EndpointID: "e-vanished"}))
	must(b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: "10.30.0.0/16", Address: strings.Split(again, "/")[0]}))
	must(b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: "10.30.0.0/16", Address: "10.30.0.5"})) // the CNI container's
	if len(svc.allocs) != 3 {
		t.Fatalf("late releases took addresses in use: %v left", holders())
	}
	// A release of an address whose endpoint is recorded but not joined
	// (between CreateEndpoint and Join) is left alone too.
	a, err := b.RequestAddress(ctx, cnm.RequestAddressRequest{PoolID: "10.30.0.0/16"})
	must(err)
	_, err = b.CreateEndpoint(ctx, cnm.CreateEndpointRequest{NetworkID: "n", EndpointID: "e-created", Interface: &cnm.EndpointInterface{Address: a.Address}})
	must(err)
	must(b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: "10.30.0.0/16", Address: strings.Split(a.Address, "/")[0]}))
	if len(svc.allocs) != 4 {
		t.Fatalf("a release took the address of a created endpoint: %v left", holders())
	}
	// Once dockerd has deleted it, its release releases.
	must(b.DeleteEndpoint(ctx, cnm.EndpointRequest{NetworkID: "n", EndpointID: "e-created"}))
	must(b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: "10.30.0.0/16", Address: strings.Split(a.Address, "/")[0]}))
	if len(svc.allocs) != 3 {
		t.Fatalf("a release after DeleteEndpoint left %v", holders())
	}
	// A joined endpoint's address stays while its veth is attached, even
	// without its record.
	delete(store.deps, store.key("a", "e-running"))
	must(b.ReleaseAddress(ctx, cnm.ReleaseAddressRequest{PoolID: "10.30.0.0/16", Address: strings.Split(running, "/")[0]}))
	if len(svc.allocs) != 3 {
		t.Fatalf("a release took the address of a joined endpoint: %v left", holders())
	}
}
