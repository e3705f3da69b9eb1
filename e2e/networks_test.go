package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/firewall"
)

// ctl runs overlayctl and fails the test when it fails.
func ctl(t *testing.T, n *simnet.Net, args ...string) string {
	t.Helper()
	out, err := n.Ctl(context.Background(), args...)
	if err != nil {
		t.Fatalf("overlayctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// waitServed waits until every host's overlayd says network is ready.
func waitServed(t *testing.T, n *simnet.Net, network string, hosts ...*simnet.Host) time.Duration {
	t.Helper()
	start := time.Now()
	for _, h := range hosts {
		if err := h.WaitNetwork(context.Background(), network); err != nil {
			t.Fatal(err)
		}
	}
	return time.Since(start)
}

// hasLink reports whether host h has a link named name.
func hasLink(t *testing.T, h *simnet.Host, name string) bool {
	t.Helper()
	out, err := h.Exec(context.Background(), "ip", "-o", "link", "show")
	if err != nil {
		t.Fatalf("%s: ip link: %v: %s", h.Name, err, out)
	}
	return strings.Contains(string(out), " "+name+":") || strings.Contains(string(out), " "+name+"@")
}

// waitNoLinks waits until no host has a device of network.
func waitNoLinks(t *testing.T, network string, hosts ...*simnet.Host) {
	t.Helper()
	for _, h := range hosts {
		eventually(t, 15*time.Second, h.Name+": the devices of deleted network "+network+" gone", func() error {
			if hasLink(t, h, "ovbr-"+network) || hasLink(t, h, "ovvx-"+network) {
				return errors.New("still there")
			}
			return nil
		})
	}
}

// TestNetworksAtRunTime: networks created with overlayctl while overlayd
// runs are served on every host within a second or so; containers on
// each reach their own network across hosts, and a container on both
// reaches both; restarting overlayd keeps every network and flow;
// deleting a network is refused while it is in use, and then removes
// its devices and etcd keys everywhere, also on a host that was down
// at the time.
func TestNetworksAtRunTime(t *testing.T) {
	ctx := context.Background()
	n := newNet(t, 3)
	h0, h1, h2 := n.Hosts[0], n.Hosts[1], n.Hosts[2]

	out := ctl(t, n, "network", "create", "red", "--cidr", "10.30.0.0/16", "--label", "team=red")
	if !strings.Contains(out, "created network red") {
		t.Fatalf("create: %s", out)
	}
	t.Logf("red usable on 3 hosts %s after the command", waitServed(t, n, "red", h0, h1, h2))
	ctl(t, n, "network", "create", "blue", "--cidr", "10.31.0.0/16")
	t.Logf("blue usable on 3 hosts %s after the command", waitServed(t, n, "blue", h0, h1, h2))
	if out := ctl(t, n, "network", "list"); !strings.Contains(out, "red") || !strings.Contains(out, "team=red") || !strings.Contains(out, "default") {
		t.Fatalf("list: %s", out)
	}

	r0, err := n.AddContainerOn(ctx, h0, "r0", "red")
	if err != nil {
		t.Fatal(err)
	}
	r1, err := n.AddContainerOn(ctx, h1, "r1", "red")
	if err != nil {
		t.Fatal(err)
	}
	b1, err := n.AddContainerOn(ctx, h1, "b1", "blue")
	if err != nil {
		t.Fatal(err)
	}
	b2, err := n.AddContainerOn(ctx, h2, "b2", "blue")
	if err != nil {
		t.Fatal(err)
	}
	// One container on both networks: red as eth0, blue as eth1.
	both, err := n.AddContainerOn(ctx, h2, "both", "red")
	if err != nil {
		t.Fatal(err)
	}
	bothBlue, err := n.Join(ctx, both, "blue", "eth1")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		pfx  string
		addr string
	}{{"r0", "10.30.", r0.Addr.String()}, {"b1", "10.31.", b1.Addr.String()}, {"both eth0", "10.30.", both.Addr.String()}, {"both eth1", "10.31.", bothBlue.Addr.String()}} {
		if !strings.HasPrefix(c.addr, c.pfx) {
			t.Fatalf("%s got %s, want an address of %s*", c.name, c.addr, c.pfx)
		}
	}
	pings := func(when string) {
		t.Helper()
		for _, p := range []struct {
			from *simnet.Container
			to   *simnet.Container
		}{{r0, r1}, {r1, r0}, {b1, b2}, {b2, b1}, {both, r0}, {both, r1}, {bothBlue, b1}, {r0, both}, {b1, bothBlue}} {
			if err := p.from.Ping(ctx, p.to.Addr.Addr(), 2); err != nil {
				t.Fatalf("%s: %v", when, err)
			}
		}
	}
	pings("networks created at run time")

	// Endpoints: each interface's MAC address, the container's own, and
	// its labels (CNI args.cni.labels and runtimeConfig.labels) are in
	// etcd, as overlayctl shows them.
	lab, err := n.NewContainer(ctx, h1, "lab")
	if err != nil {
		t.Fatal(err)
	}
	lab.ConfList = fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":"overlay-red","plugins":[{"type":"overlay-cni","network":"red","socket":%q,
		"capabilities":{"labels":true},"args":{"cni":{"labels":[{"key":"app","value":"web"}]}}}]}`, h1.Socket)
	lab.CapabilityArgs = map[string]any{"labels": map[string]string{"tier": "front"}}
	if err := n.Attach(ctx, lab); err != nil {
		t.Fatal(err)
	}
	checkEndpoints := func(when string, want map[string]map[string]string, cs ...*simnet.Container) {
		t.Helper()
		eventually(t, 10*time.Second, when+": the endpoints of red in etcd", func() error {
			eps := endpoints(t, n, "red")
			for _, c := range cs {
				mac := containerMAC(t, c)
				ep, ok := eps[c.ID]
				switch {
				case !ok:
					return fmt.Errorf("%s is not listed: %v", c.ID, eps)
				case ep.MAC != mac || ep.Addr != c.Addr || ep.Host != hostID(t, c.Host):
					return fmt.Errorf("%s is listed as %+v; its interface has %s, MAC %s, on %s", c.ID, ep, c.Addr, mac, c.Host.Name)
				case !maps.Equal(ep.Labels, want[c.ID]):
					return fmt.Errorf("%s has labels %v; want %v", c.ID, ep.Labels, want[c.ID])
				}
			}
			return nil
		})
	}
	labels := map[string]map[string]string{"lab": {"app": "web", "tier": "front"}}
	checkEndpoints("after ADD", labels, r0, r1, both, lab)
	if out := ctl(t, n, "endpoint", "list", "red", "--label", "app=web"); !strings.Contains(out, "lab") || strings.Contains(out, "r0") {
		t.Fatalf("endpoint list --label app=web:\n%s", out)
	}

	// A restart keeps every network and flow.
	if err := h1.Stop(); err != nil {
		t.Fatal(err)
	}
	pings("overlayd stopped on " + h1.Name)
	if err := h1.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitServed(t, n, "red", h1)
	waitServed(t, n, "blue", h1)
	pings("overlayd restarted on " + h1.Name)
	// The restarted overlayd kept the endpoints in its own file: etcd's
	// copy of lab's, deleted now, comes back whole from it.
	estore, closeEStore, err := n.Store(ctx)
	if err != nil {
		t.Fatal(err)
	}
	key := fmt.Sprintf("%snetworks/red/addrs/%s-%d/%s", etcd.DefaultPrefix, lab.Addr.Masked().Addr(), lab.Addr.Bits(), lab.Addr.Addr())
	if resp, err := estore.Client().Delete(ctx, key); err != nil || resp.Deleted != 1 {
		t.Fatalf("delete %s: %v, %v", key, resp, err)
	}
	closeEStore()
	checkEndpoints("overlayd restarted on "+h1.Name+", lab's record in etcd deleted", labels, r0, r1, both, lab)

	// Deleting a network in use is refused; nothing changes.
	time.Sleep(300 * time.Millisecond) // the mirrors copy the allocations to etcd
	if out, err := n.Ctl(ctx, "network", "delete", "blue"); err == nil || !strings.Contains(string(out), "force") {
		t.Fatalf("deleting a network in use: %v: %s", err, out)
	}
	for _, c := range []*simnet.Container{b1, b2, bothBlue} {
		if err := n.DelContainer(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	ctl(t, n, "network", "delete", "blue")
	waitNoLinks(t, "blue", h0, h1, h2)
	pings2 := func() {
		t.Helper()
		for _, p := range [][2]*simnet.Container{{r0, r1}, {both, r0}} {
			if err := p[0].Ping(ctx, p[1].Addr.Addr(), 2); err != nil {
				t.Fatalf("after deleting blue: %v", err)
			}
		}
	}
	pings2()

	// A network deleted while a host is down is removed when it comes
	// back.
	if err := h2.Stop(); err != nil {
		t.Fatal(err)
	}
	out = ctl(t, n, "network", "delete", "--force", "red")
	if !strings.Contains(out, "released the addresses of") {
		t.Fatalf("forced delete: %s", out)
	}
	waitNoLinks(t, "red", h0, h1)
	if !hasLink(t, h2, "ovvx-red") {
		t.Fatal("red's device is gone from the stopped host: the test proves nothing")
	}
	if err := h2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitNoLinks(t, "red", h2)

	store, closeStore, err := n.Store(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer closeStore()
	for _, net := range []string{"red", "blue"} {
		resp, err := store.Client().Get(ctx, etcd.DefaultPrefix+"networks/"+net+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil || resp.Count != 0 {
			t.Fatalf("etcd keys of deleted network %s: %v, %v", net, resp, err)
		}
	}
	// The container attached to a deleted network gets "unknown network"
	// for a new ADD, and its DEL succeeds.
	_, err = n.AddContainerOn(ctx, h0, "late", "red")
	if err == nil || !strings.Contains(err.Error(), "unknown network") {
		t.Fatalf("ADD on a deleted network: %v", err)
	}
	if err := n.DelContainer(ctx, r0); err != nil {
		t.Fatalf("DEL of a container of a deleted network: %v", err)
	}
	// The default network, made sure of by the flags, is untouched.
	if err := h0.Status(ctx); err != nil {
		t.Fatalf("default network after the deletions: %v", err)
	}
}

// endpoints returns the endpoints of network that overlayctl lists, by
// container ID.
func endpoints(t *testing.T, n *simnet.Net, network string) map[string]etcd.EndpointRecord {
	t.Helper()
	var list []etcd.EndpointRecord
	if err := json.Unmarshal([]byte(ctl(t, n, "endpoint", "list", network, "--json")), &list); err != nil {
		t.Fatalf("endpoint list --json: %v", err)
	}
	out := make(map[string]etcd.EndpointRecord, len(list))
	for _, ep := range list {
		out[ep.ContainerID] = ep
	}
	return out
}

// containerMAC returns the MAC address of c's interface, as its kernel
// has it.
func containerMAC(t *testing.T, c *simnet.Container) string {
	t.Helper()
	ifname := c.IfName
	if ifname == "" {
		ifname = "eth0"
	}
	out, err := c.Exec(context.Background(), "cat", "/sys/class/net/"+ifname+"/address")
	if err != nil {
		t.Fatalf("MAC of %s: %v: %s", c.ID, err, out)
	}
	return strings.TrimSpace(string(out))
}

// unreachable fails the test when from reaches to.
func unreachable(t *testing.T, from, to *simnet.Container) {
	t.Helper()
	if err := from.Ping(context.Background(), to.Addr.Addr(), 1); err == nil {
		t.Fatalf("%s (%s) reaches %s (%s) on another network", from.ID, from.Addr, to.ID, to.Addr)
	}
}

// firewallRules returns the comments of the rules of host h's nftables
// table.
func firewallRules(t *testing.T, h *simnet.Host) []string {
	t.Helper()
	fd, err := netns.GetFromName(h.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	tbl, err := firewall.New(nftables.WithNetNSFd(int(fd)))
	if err != nil {
		t.Fatal(err)
	}
	f, p, err := tbl.Comments()
	if err != nil {
		t.Fatal(err)
	}
	return append(f, p...)
}

// TestNetworksIsolatedAndMasqueraded: containers on different networks
// cannot reach each other, on one host or across hosts, though each
// reaches its own network; a container's egress to an address outside
// the overlay leaves with its host's underlay address, and traffic
// between containers keeps their own; deleting a network removes its
// rules everywhere.
func TestNetworksIsolatedAndMasqueraded(t *testing.T) {
	ctx := context.Background()
	n := newNet(t, 3)
	h0, h1 := n.Hosts[0], n.Hosts[1]
	inet, err := n.AddInternet(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ctl(t, n, "network", "create", "red", "--cidr", "10.30.0.0/16")
	ctl(t, n, "network", "create", "blue", "--cidr", "10.31.0.0/16")
	waitServed(t, n, "red", n.Hosts...)
	waitServed(t, n, "blue", n.Hosts...)

	add := func(h *simnet.Host, id, network string) *simnet.Container {
		t.Helper()
		var c *simnet.Container
		var err error
		if network == "default" {
			c, err = n.AddContainer(ctx, h, id)
		} else {
			c, err = n.AddContainerOn(ctx, h, id, network)
		}
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	r0, r1 := add(h0, "r0", "red"), add(h1, "r1", "red")
	b0, b1 := add(h0, "b0", "blue"), add(h1, "b1", "blue")
	d1 := add(h1, "d1", "default")
	for _, p := range [][2]*simnet.Container{{r0, r1}, {b0, b1}, {b1, b0}} {
		if err := p[0].Ping(ctx, p[1].Addr.Addr(), 2); err != nil {
			t.Fatal(err)
		}
	}
	unreachable(t, r0, b0) // one host
	unreachable(t, r0, b1) // across hosts
	unreachable(t, b1, r0)
	unreachable(t, d1, r1)
	unreachable(t, r1, d1)

	// Between containers the source is the container's own address.
	l, err := r1.Listen(8080)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	seen := func(l net.Listener, dial func() (net.Conn, error)) netip.Addr {
		t.Helper()
		got := make(chan net.Addr, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				got <- nil
				return
			}
			got <- c.RemoteAddr()
			c.Close()
		}()
		c, err := dial()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		a := <-got
		if a == nil {
			t.Fatal("accept failed")
		}
		return netip.MustParseAddrPort(a.String()).Addr()
	}
	if src := seen(l, func() (net.Conn, error) { return r0.Dial(ctx, netip.AddrPortFrom(r1.Addr.Addr(), 8080)) }); src != r0.Addr.Addr() {
		t.Fatalf("r1 sees r0 as %s: traffic inside the overlay was masqueraded", src)
	}
	// To the outside, the source is the host's underlay address.
	ol, err := inet.Listen(8080)
	if err != nil {
		t.Fatal(err)
	}
	defer ol.Close()
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if src := seen(ol, func() (net.Conn, error) { return r0.Dial(dctx, netip.AddrPortFrom(inet.Addr, 8080)) }); src != h0.Underlay {
		t.Fatalf("the outside sees r0 as %s, want its host's underlay address %s", src, h0.Underlay)
	}

	// The rules stay while overlayd is stopped.
	if err := h0.Stop(); err != nil {
		t.Fatal(err)
	}
	unreachable(t, r0, b0)
	if err := h0.Start(ctx); err != nil {
		t.Fatal(err)
	}

	// Deleting blue takes its rules away on every host.
	for _, c := range []*simnet.Container{b0, b1} {
		if err := n.DelContainer(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	ctl(t, n, "network", "delete", "blue")
	waitNoLinks(t, "blue", n.Hosts...)
	for _, h := range n.Hosts {
		eventually(t, 15*time.Second, h.Name+": blue's rules gone, red's kept", func() error {
			rules := firewallRules(t, h)
			if len(rules) == 0 || slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, "blue") }) {
				return fmt.Errorf("rules %q", rules)
			}
			return nil
		})
	}
}

// TestNetworkRecreatedWhileHostDown: a network deleted and created again
// under its name while a host is down is a new network to that host when
// it comes back: the old containers' veths go, and new containers get the
// new address space and reach the other hosts.
func TestNetworkRecreatedWhileHostDown(t *testing.T) {
	ctx := context.Background()
	n := newNet(t, 2)
	h0, h1 := n.Hosts[0], n.Hosts[1]
	ctl(t, n, "network", "create", "red", "--cidr", "10.30.0.0/16")
	waitServed(t, n, "red", h0, h1)
	if _, err := n.AddContainerOn(ctx, h1, "old", "red"); err != nil {
		t.Fatal(err)
	}
	veth := overlay.HostVethName("red", overlay.AttachmentKey{ContainerID: "old", IfName: "eth0"})
	if !hasLink(t, h1, veth) {
		t.Fatalf("no host veth %s for the old container", veth)
	}
	if err := h1.Stop(); err != nil {
		t.Fatal(err)
	}
	ctl(t, n, "network", "delete", "--force", "red")
	ctl(t, n, "network", "create", "red", "--cidr", "10.40.0.0/16")
	if err := h1.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitServed(t, n, "red", h0, h1)
	if hasLink(t, h1, veth) {
		t.Fatal("the old network's container is still on the bridge of the new one")
	}
	a, err := n.AddContainerOn(ctx, h0, "a", "red")
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.AddContainerOn(ctx, h1, "b", "red")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(b.Addr.String(), "10.40.") {
		t.Fatalf("new container on the returning host got %s, want an address of 10.40.0.0/16", b.Addr)
	}
	if err := b.Ping(ctx, a.Addr.Addr(), 2); err != nil {
		t.Fatal(err)
	}
}
