package vxlan

// The tests here that need root build simulated hosts in network
// namespaces this test binary creates, named with a prefix unique to the
// run. They never change the root namespace and remove every namespace
// they made, also when they fail; TestMain checks that none is left.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/overlaytest"
)

// runPrefix starts the name of every namespace this run creates.
var runPrefix = "ovvx" + randHex(2)

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func TestMain(m *testing.M) {
	code := m.Run()
	if leaked := ourNamespaces(); len(leaked) > 0 {
		fmt.Fprintf(os.Stderr, "namespaces left behind, deleting them: %v\n", leaked)
		for _, name := range leaked {
			exec.Command("ip", "netns", "del", name).Run()
		}
		code = 1
	}
	os.Exit(code)
}

// ourNamespaces returns the named namespaces of this run.
func ourNamespaces() []string {
	entries, _ := os.ReadDir("/run/netns")
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), runPrefix+"-") {
			out = append(out, e.Name())
		}
	}
	return out
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces and VXLAN devices (run the tests as root)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("skipping: needs the ip command of iproute2 to create network namespaces")
	}
}

// testNS is a network namespace the test created and a handle on it.
type testNS struct {
	name string
	fd   netns.NsHandle
	h    *netlink.Handle
}

// newNS creates a namespace, with lo up, removed when the test ends.
func newNS(t testing.TB, tag string) *testNS {
	t.Helper()
	test := strings.ToLower(strings.NewReplacer("/", "_", "#", "_").Replace(t.Name()))
	name := fmt.Sprintf("%s-%s-%s", runPrefix, test, tag)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	fd, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open namespace %s: %v", name, err)
	}
	t.Cleanup(func() { fd.Close() })
	h, err := netlink.NewHandleAt(fd)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", name, err)
	}
	t.Cleanup(h.Close)
	ns := &testNS{name: name, fd: fd, h: h}
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatalf("lo in %s: %v", name, err)
	}
	ns.must(t, h.LinkSetUp(lo), "set lo up")
	return ns
}

func (ns *testNS) must(t testing.TB, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %s: %v", ns.name, what, err)
	}
}

func (ns *testNS) link(t testing.TB, name string) netlink.Link {
	t.Helper()
	link, err := ns.h.LinkByName(name)
	ns.must(t, err, "get link "+name)
	return link
}

// addAddr adds the address s ("198.18.0.1/24") to the link name.
func (ns *testNS) addAddr(t testing.TB, name, s string) {
	t.Helper()
	ns.must(t, ns.h.AddrAdd(ns.link(t, name), &netlink.Addr{IPNet: ipNet(netip.MustParsePrefix(s))}), "add address "+s+" to "+name)
}

// host is a simulated host: a namespace with its dataplane and config.
type host struct {
	*testNS
	dp  *Linux
	cfg overlay.DataplaneConfig
}

func (h *host) set(t *testing.T) {
	t.Helper()
	if err := h.dp.Set(context.Background(), h.cfg); err != nil {
		t.Fatalf("%s: Set: %v", h.name, err)
	}
}

// checkText compares the kernel state with the golden text of h.cfg.
func (h *host) checkText(t *testing.T) {
	t.Helper()
	h.checkTextIs(t, overlaytest.ConfigText(h.cfg))
}

func (h *host) checkTextIs(t *testing.T, want string) {
	t.Helper()
	got, err := h.dp.Text(h.cfg.Network)
	if err != nil {
		t.Fatalf("%s: Text: %v", h.name, err)
	}
	if got != want {
		t.Errorf("%s: kernel state:\n%s\nwant:\n%s", h.name, got, want)
	}
}

func newDataplane(t testing.TB, ns *testNS) *Linux {
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	fdb, err := OpenNeighSocket(ns.fd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fdb.Close)
	return New(ns.h, fdb, log.With("ns", ns.name))
}

// testWriter sends the dataplane's logs to the test log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

var (
	macA = mustMAC("02:00:00:00:00:0a")
	macB = mustMAC("02:00:00:00:00:0b")
	macC = mustMAC("02:00:00:00:00:0c")
)

const testMTU = 1450

// addVeth adds a veth pair name (with address addr and MTU mtu unless 0)
// and name-peer, both up. (Some kernels have no dummy devices.)
func (ns *testNS) addVeth(t testing.TB, name, addr string, mtu int) {
	t.Helper()
	ns.must(t, ns.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}, PeerName: name + "p"}), "add veth pair "+name)
	ns.addAddr(t, name, addr)
	ns.must(t, ns.h.LinkSetUp(ns.link(t, name)), "set "+name+" up")
	ns.must(t, ns.h.LinkSetUp(ns.link(t, name+"p")), "set "+name+"p up")
}

// oneHost returns a host whose underlay is a veth ul0 with
// 198.18.0.1/24, one block 198.19.0.0/26 and no peers.
func oneHost(t testing.TB) *host {
	ns := newNS(t, "a")
	ns.addVeth(t, "ul0", "198.18.0.1/24", 0)
	return &host{testNS: ns, dp: newDataplane(t, ns), cfg: overlay.DataplaneConfig{
		Network:      testNetwork(),
		Underlay:     netip.MustParseAddr("198.18.0.1"),
		UnderlayLink: "ul0",
		MTU:          testMTU,
		VTEPMAC:      macA,
		Blocks:       prefixes("198.19.0.0/26"),
	}}
}

// twoHosts returns hosts A (198.18.0.1, block 198.19.0.0/26) and B
// (198.18.0.2, block 198.19.0.64/26) joined by a veth pair ul0, each the
// other's peer. Nothing is set yet.
func twoHosts(t *testing.T) (a, b *host) {
	nsA, nsB := newNS(t, "a"), newNS(t, "b")
	nsA.must(t, nsA.h.LinkAdd(&netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "ul0"},
		PeerName:      "ul0",
		PeerNamespace: netlink.NsFd(nsB.fd),
	}), "add veth pair ul0")
	nsA.addAddr(t, "ul0", "198.18.0.1/24")
	nsB.addAddr(t, "ul0", "198.18.0.2/24")
	nsA.must(t, nsA.h.LinkSetUp(nsA.link(t, "ul0")), "set ul0 up")
	nsB.must(t, nsB.h.LinkSetUp(nsB.link(t, "ul0")), "set ul0 up")

	cfg := func(self, peer string, selfMAC, peerMAC net.HardwareAddr, selfBlock, peerBlock string) overlay.DataplaneConfig {
		return overlay.DataplaneConfig{
			Network:      testNetwork(),
			Underlay:     netip.MustParseAddr(self),
			UnderlayLink: "ul0",
			MTU:          testMTU,
			VTEPMAC:      selfMAC,
			Blocks:       prefixes(selfBlock),
			Peers: []overlay.Peer{{
				Host:     overlay.HostID("host-" + peer),
				Underlay: netip.MustParseAddr(peer),
				VTEPMAC:  peerMAC,
				Blocks:   prefixes(peerBlock),
			}},
		}
	}
	a = &host{testNS: nsA, dp: newDataplane(t, nsA), cfg: cfg("198.18.0.1", "198.18.0.2", macA, macB, "198.19.0.0/26", "198.19.0.64/26")}
	b = &host{testNS: nsB, dp: newDataplane(t, nsB), cfg: cfg("198.18.0.2", "198.18.0.1", macB, macA, "198.19.0.64/26", "198.19.0.0/26")}
	return a, b
}

// checkTraffic checks that A reaches B's gateway across the overlay, from
// A's gateway: with ping when it is installed, and always with a UDP
// exchange.
func checkTraffic(t *testing.T, a, b *host) {
	t.Helper()
	if _, err := exec.LookPath("ping"); err != nil {
		t.Log("ping is not installed (Debian: iputils-ping): checking with UDP only")
	} else {
		cmd := exec.Command("ip", "netns", "exec", a.name, "ping", "-c1", "-W2", "-I", "198.19.0.1", "198.19.0.65")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("ping from %s: %v\n%s", a.name, err, out)
		}
	}

	server, err := socketIn(b.fd, func() (*net.UDPConn, error) {
		return net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.19.0.65:7777")))
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", b.name, err)
	}
	defer server.Close()
	client, err := socketIn(a.fd, func() (*net.UDPConn, error) {
		return net.DialUDP("udp4",
			net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.19.0.1:0")),
			net.UDPAddrFromAddrPort(netip.MustParseAddrPort("198.19.0.65:7777")))
	})
	if err != nil {
		t.Fatalf("dial in %s: %v", a.name, err)
	}
	defer client.Close()

	deadline := time.Now().Add(2 * time.Second)
	server.SetDeadline(deadline)
	client.SetDeadline(deadline)
	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatalf("send from %s: %v", a.name, err)
	}
	buf := make([]byte, 64)
	n, from, err := server.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("receive in %s: %v", b.name, err)
	}
	if string(buf[:n]) != "hello" || from.Addr() != netip.MustParseAddr("198.19.0.1") {
		t.Fatalf("%s received %q from %s, want \"hello\" from 198.19.0.1", b.name, buf[:n], from)
	}
	if _, err := server.WriteToUDPAddrPort([]byte("olleh"), from); err != nil {
		t.Fatalf("reply from %s: %v", b.name, err)
	}
	if n, err := client.Read(buf); err != nil || string(buf[:n]) != "olleh" {
		t.Fatalf("reply in %s: %q, %v", a.name, buf[:n], err)
	}
}

// socketIn opens a socket in namespace ns. The namespace is entered on a
// locked thread of a goroutine of its own, which exits without unlocking
// it so that the runtime discards the thread: the test's threads never
// leave their namespace.
func socketIn[C any](ns netns.NsHandle, open func() (C, error)) (C, error) {
	type result struct {
		c   C
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			var zero C
			ch <- result{zero, fmt.Errorf("enter namespace: %w", err)}
			return
		}
		c, err := open()
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// timerRE matches the bridge's running timers in ip -d link show.
var timerRE = regexp.MustCompile(`(_timer)\s+[0-9.]+`)

// snapshot returns what ip(8) and bridge(8) show of the namespace, for
// comparisons that go beyond Text.
func (ns *testNS) snapshot(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "-d", "link", "show"},
		{"ip", "-4", "addr", "show"},
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "neigh", "show", "nud", "permanent"},
		{"bridge", "fdb", "show"},
	} {
		out, err := exec.Command(args[0], append([]string{"-n", ns.name}, args[1:]...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
		out = timerRE.ReplaceAll(out, []byte("$1"))
		fmt.Fprintf(&b, "$ %s\n%s", strings.Join(args, " "), out)
	}
	return b.String()
}

func TestTwoHostsTraffic(t *testing.T) {
	requireRoot(t)
	a, b := twoHosts(t)
	a.set(t)
	b.set(t)
	a.checkText(t)
	b.checkText(t)
	checkTraffic(t, a, b)

	vx, ok := a.link(t, a.cfg.Network.VXLANName()).(*netlink.Vxlan)
	if !ok {
		t.Fatalf("%s is not a VXLAN device", a.cfg.Network.VXLANName())
	}
	if vx.VxlanId != overlay.DefaultVNI || vx.Port != overlay.DefaultPort || vx.Learning ||
		!vx.SrcAddr.Equal(net.ParseIP("198.18.0.1")) || vx.VtepDevIndex != a.link(t, "ul0").Attrs().Index ||
		vx.MTU != testMTU || vx.HardwareAddr.String() != macA.String() || vx.MasterIndex != 0 {
		t.Errorf("VXLAN device %+v", vx)
	}
	br := a.link(t, a.cfg.Network.BridgeName())
	if br.Type() != "bridge" || br.Attrs().MTU != testMTU || br.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("bridge %+v", br.Attrs())
	}
	routes, err := a.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: vx.Index}, netlink.RT_FILTER_OIF)
	a.must(t, err, "list routes")
	if len(routes) != 1 || routes[0].Protocol != RouteProtocol || !routes[0].Src.Equal(net.ParseIP("198.19.0.1")) ||
		routes[0].Flags&int(netlink.FLAG_ONLINK) == 0 {
		t.Errorf("routes on %s: %+v, want one onlink with protocol %d and source 198.19.0.1", vx.Name, routes, RouteProtocol)
	}
}

func TestSetTwiceChangesNothing(t *testing.T) {
	requireRoot(t)
	a, b := twoHosts(t)
	a.set(t)
	b.set(t)
	before := a.snapshot(t)
	a.set(t)
	a.checkText(t)
	if after := a.snapshot(t); after != before {
		t.Errorf("second Set changed the namespace:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func TestPeerChanges(t *testing.T) {
	requireRoot(t)
	a := oneHost(t)
	peerB := overlay.Peer{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: macB, Blocks: prefixes("198.19.0.64/26")}
	peerC := overlay.Peer{Host: "c", Underlay: netip.MustParseAddr("198.18.0.3"), VTEPMAC: macC, Blocks: prefixes("198.19.0.128/26", "198.19.0.192/26")}
	a.cfg.Peers = []overlay.Peer{peerB, peerC}
	a.set(t)
	a.checkText(t)
	gw := len(a.cfg.Blocks)
	checkStats(t, a.dp.Stats(),
		map[string]int{"fdb": 2, "neighbour": 2, "route": 3, "gateway": gw},
		map[string]uint64{"fdb": 2, "neighbour": 2, "route": 3, "gateway": uint64(gw)},
		map[string]uint64{})

	// C leaves; B gains a block.
	peerB.Blocks = prefixes("198.19.0.64/26", "198.19.1.0/26")
	a.cfg.Peers = []overlay.Peer{peerB}
	a.set(t)
	a.checkText(t)
	checkStats(t, a.dp.Stats(),
		map[string]int{"fdb": 1, "neighbour": 1, "route": 2, "gateway": gw},
		map[string]uint64{"fdb": 2, "neighbour": 2, "route": 4, "gateway": uint64(gw)},
		map[string]uint64{"fdb": 1, "neighbour": 1, "route": 2})
	text, _ := a.dp.Text(a.cfg.Network)
	if strings.Contains(text, "198.18.0.3") || strings.Contains(text, macC.String()) {
		t.Errorf("entries of the removed peer remain:\n%s", text)
	}

	// B moves to another underlay address, then gets another VTEP MAC.
	peerB.Underlay = netip.MustParseAddr("198.18.0.4")
	a.cfg.Peers = []overlay.Peer{peerB}
	a.set(t)
	a.checkText(t)
	peerB.VTEPMAC = macC
	a.cfg.Peers = []overlay.Peer{peerB}
	a.set(t)
	a.checkText(t)

	// No peers, no blocks.
	a.cfg.Peers, a.cfg.Blocks = nil, nil
	a.set(t)
	a.checkTextIs(t, "")
}

// checkStats compares what a dataplane says it programmed with what a
// test made it do; a kind missing from a map is 0.
func checkStats(t *testing.T, got Stats, entries map[string]int, added, deleted map[string]uint64) {
	t.Helper()
	for _, kind := range []string{"fdb", "neighbour", "route", "gateway"} {
		if got.Entries[kind] != entries[kind] || got.Added[kind] != added[kind] || got.Deleted[kind] != deleted[kind] {
			t.Errorf("%s: %d entries, %d added, %d deleted; want %d, %d, %d", kind,
				got.Entries[kind], got.Added[kind], got.Deleted[kind], entries[kind], added[kind], deleted[kind])
		}
	}
}

func TestRecreatesDeletedDevice(t *testing.T) {
	requireRoot(t)
	a, b := twoHosts(t)
	a.set(t)
	b.set(t)
	vx := a.link(t, a.cfg.Network.VXLANName())
	a.must(t, a.h.LinkDel(vx), "delete the VXLAN device")
	if _, err := a.dp.Text(a.cfg.Network); !errors.Is(err, overlay.ErrNotFound) {
		t.Errorf("Text without the VXLAN device: %v, want overlay.ErrNotFound", err)
	}
	a.set(t)
	a.checkText(t)
	if got := a.link(t, a.cfg.Network.VXLANName()).Attrs().Index; got == vx.Attrs().Index {
		t.Errorf("VXLAN device has its old index %d", got)
	}
	checkTraffic(t, a, b)

	a.must(t, a.h.LinkDel(a.link(t, a.cfg.Network.BridgeName())), "delete the bridge")
	a.set(t)
	a.checkText(t)
	checkTraffic(t, a, b)
}

func TestRemovesStaleEntries(t *testing.T) {
	requireRoot(t)
	a := oneHost(t)
	a.cfg.Peers = []overlay.Peer{{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: macB, Blocks: prefixes("198.19.0.64/26")}}
	a.set(t)

	vx := a.link(t, a.cfg.Network.VXLANName())
	br := a.link(t, a.cfg.Network.BridgeName())
	idx := vx.Attrs().Index
	stale := routeEntry{Dst: netip.MustParsePrefix("198.19.3.0/26"), Gw: netip.MustParseAddr("198.18.0.9"), OnLink: true, Proto: RouteProtocol}
	a.must(t, a.h.RouteAdd(route(idx, stale)), "add stale route")
	// Same destination as a wanted route, another metric.
	staleMetric := routeEntry{Dst: netip.MustParsePrefix("198.19.0.64/26"), Gw: netip.MustParseAddr("198.18.0.9"), OnLink: true, Proto: RouteProtocol, Metric: 50}
	a.must(t, a.h.RouteAdd(route(idx, staleMetric)), "add stale route with a metric")
	foreign := routeEntry{Dst: netip.MustParsePrefix("198.19.4.0/26"), Gw: netip.MustParseAddr("198.18.0.10"), OnLink: true, Proto: unix.RTPROT_STATIC}
	a.must(t, a.h.RouteAdd(route(idx, foreign)), "add foreign route")
	staleMAC := mac{2, 0, 0, 0, 0, 9}
	a.must(t, a.h.NeighSet(neigh(idx, neighEntry{IP: netip.MustParseAddr("198.18.0.9"), MAC: staleMAC})), "add stale neighbour")
	a.must(t, a.h.NeighSet(fdbNeigh(idx, fdbEntry{MAC: staleMAC, Dst: netip.MustParseAddr("198.18.0.9")})), "add stale FDB entry")
	// A default (all-zero) FDB entry is not one Set makes: it stays.
	a.must(t, a.h.NeighAppend(fdbNeigh(idx, fdbEntry{Dst: netip.MustParseAddr("198.18.0.8")})), "append default FDB entry")
	a.addAddr(t, br.Attrs().Name, "198.19.5.1/26")
	a.addAddr(t, br.Attrs().Name, "192.0.2.1/24")
	// A wanted gateway with another prefix length.
	a.addAddr(t, br.Attrs().Name, "198.19.0.1/24")

	a.set(t)
	a.checkTextIs(t, overlaytest.ConfigText(a.cfg)+"\nroute 198.19.4.0/26 via 198.18.0.10")
	addrs, err := a.h.AddrList(br, netlink.FAMILY_V4)
	a.must(t, err, "list addresses")
	if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IPNet.String() == "192.0.2.1/24" }) {
		t.Errorf("address 192.0.2.1/24 outside the network was removed from the bridge: %v", addrs)
	}
	fdb, err := a.h.NeighList(idx, unix.AF_BRIDGE)
	a.must(t, err, "list FDB")
	if !slices.ContainsFunc(fdb, func(n netlink.Neigh) bool { return n.IP.Equal(net.ParseIP("198.18.0.8")) }) {
		t.Errorf("the default FDB entry was removed: %v", fdb)
	}
	routes, err := a.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: idx}, netlink.RT_FILTER_OIF)
	a.must(t, err, "list routes")
	if len(routes) != 2 {
		t.Errorf("routes %v, want the wanted and the foreign one", routes)
	}
}

func TestDeviceChanges(t *testing.T) {
	requireRoot(t)
	a := oneHost(t)
	a.cfg.Peers = []overlay.Peer{{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: macB, Blocks: prefixes("198.19.0.64/26")}}
	a.set(t)
	name := a.cfg.Network.VXLANName()
	idx := a.link(t, name).Attrs().Index

	// MTU and MAC change in place.
	a.cfg.MTU = 1400
	a.cfg.VTEPMAC = macC
	a.set(t)
	a.checkText(t)
	vx := a.link(t, name)
	if vx.Attrs().Index != idx || vx.Attrs().MTU != 1400 || vx.Attrs().HardwareAddr.String() != macC.String() {
		t.Errorf("after an MTU and MAC change: index %d (was %d), MTU %d, MAC %s", vx.Attrs().Index, idx, vx.Attrs().MTU, vx.Attrs().HardwareAddr)
	}
	if mtu := a.link(t, a.cfg.Network.BridgeName()).Attrs().MTU; mtu != 1400 {
		t.Errorf("bridge MTU %d, want 1400", mtu)
	}

	// A VNI change recreates the device and refills it.
	a.cfg.Network.VNI = 4097
	a.set(t)
	a.checkText(t)
	vx = a.link(t, name)
	if vx.Attrs().Index == idx || vx.(*netlink.Vxlan).VxlanId != 4097 {
		t.Errorf("after a VNI change: index %d (was %d), VNI %d", vx.Attrs().Index, idx, vx.(*netlink.Vxlan).VxlanId)
	}

	// A device of the wrong type is replaced.
	a.must(t, a.h.LinkDel(vx), "delete the VXLAN device")
	a.must(t, a.h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}), "add a bridge in its place")
	a.set(t)
	a.checkText(t)
	if typ := a.link(t, name).Type(); typ != "vxlan" {
		t.Errorf("device type %s, want vxlan", typ)
	}

	// A missing underlay link fails the VXLAN device but not the bridge.
	a.cfg.UnderlayLink = "nosuch0"
	a.cfg.Blocks = prefixes("198.19.0.0/26", "198.19.2.0/26")
	if err := a.dp.Set(context.Background(), a.cfg); err == nil || !strings.Contains(err.Error(), "nosuch0") {
		t.Errorf("Set with a missing underlay link: %v, want an error naming it", err)
	}
	gws, err := a.dp.listGatewaysLocked(a.link(t, a.cfg.Network.BridgeName()), a.cfg.Network.CIDR)
	a.must(t, err, "list gateways")
	if len(gws) != 2 {
		t.Errorf("gateways %v, want 2", gws)
	}
}

func TestDetectUnderlay(t *testing.T) {
	requireRoot(t)
	ns := newNS(t, "a")
	ns.addVeth(t, "eth0", "198.18.0.5/24", 9000)
	ns.addVeth(t, "eth1", "198.18.1.5/24", 0)

	if _, err := DetectUnderlay(ns.h, netip.Addr{}); err == nil || !strings.Contains(err.Error(), "--underlay-addr") {
		t.Errorf("without a default route: %v, want an error telling to pass --underlay-addr", err)
	}
	want := Underlay{Addr: netip.MustParseAddr("198.18.0.5"), Link: "eth0", MTU: 9000}
	ns.must(t, ns.h.RouteAdd(&netlink.Route{Gw: net.ParseIP("198.18.0.254"), LinkIndex: ns.link(t, "eth0").Attrs().Index}), "add default route")
	if got, err := DetectUnderlay(ns.h, netip.Addr{}); err != nil || got != want {
		t.Errorf("from the default route: %+v, %v; want %+v", got, err, want)
	}
	if got, err := DetectUnderlay(ns.h, netip.MustParseAddr("198.18.1.5")); err != nil || got != (Underlay{Addr: netip.MustParseAddr("198.18.1.5"), Link: "eth1", MTU: 1500}) {
		t.Errorf("by address: %+v, %v", got, err)
	}
	if _, err := DetectUnderlay(ns.h, netip.MustParseAddr("198.18.2.5")); err == nil {
		t.Error("by an address no interface has: no error")
	}

	// A default route with a preferred source.
	ns.addAddr(t, "eth0", "198.18.0.6/24")
	ns.must(t, ns.h.RouteReplace(&netlink.Route{Gw: net.ParseIP("198.18.0.254"), Src: net.ParseIP("198.18.0.6"), LinkIndex: ns.link(t, "eth0").Attrs().Index}), "replace default route")
	want.Addr = netip.MustParseAddr("198.18.0.6")
	if got, err := DetectUnderlay(ns.h, netip.Addr{}); err != nil || got != want {
		t.Errorf("from the default route with a source: %+v, %v; want %+v", got, err, want)
	}
}

func TestDelete(t *testing.T) {
	requireRoot(t)
	a := oneHost(t)
	a.cfg.Peers = []overlay.Peer{{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: macB, Blocks: prefixes("198.19.0.64/26")}}
	a.set(t)
	ctx := context.Background()
	for i := range 2 {
		if err := a.dp.Delete(ctx, a.cfg.Network); err != nil {
			t.Fatalf("Delete #%d: %v", i+1, err)
		}
	}
	for _, name := range []string{a.cfg.Network.VXLANName(), a.cfg.Network.BridgeName()} {
		if _, err := a.h.LinkByName(name); !isLinkNotFound(err) {
			t.Errorf("device %s after Delete: %v, want not found", name, err)
		}
	}
	if _, err := a.dp.Text(a.cfg.Network); !errors.Is(err, overlay.ErrNotFound) {
		t.Errorf("Text after Delete: %v, want overlay.ErrNotFound", err)
	}
	for kind, n := range a.dp.Stats().Entries {
		if n != 0 {
			t.Errorf("%d %s entries counted after Delete", n, kind)
		}
	}
	// Set after Delete starts again from nothing.
	a.set(t)
	a.checkText(t)
}

// TestWithoutStrictHandle: a dataplane given no strict handle lists FDB
// entries through its one handle, and converges the same.
func TestWithoutStrictHandle(t *testing.T) {
	requireRoot(t)
	a, b := twoHosts(t)
	a.dp = New(a.h, nil, nil)
	a.set(t)
	b.set(t)
	a.checkText(t)
	a.must(t, a.h.NeighDel(&netlink.Neigh{LinkIndex: a.link(t, a.cfg.Network.VXLANName()).Attrs().Index, Family: unix.AF_BRIDGE,
		Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, HardwareAddr: macB, IP: net.IP(b.cfg.Underlay.AsSlice())}), "delete the FDB entry of b")
	a.set(t)
	a.checkText(t)
	checkTraffic(t, a, b)
}

func TestSetRejectsInvalidConfig(t *testing.T) {
	// No kernel access: these fail before the first netlink call.
	l := New(nil, nil, nil)
	good := overlay.DataplaneConfig{Network: testNetwork(), Underlay: netip.MustParseAddr("198.18.0.1"), VTEPMAC: macA, MTU: 1450}
	for name, mutate := range map[string]func(*overlay.DataplaneConfig){
		"network":  func(c *overlay.DataplaneConfig) { c.Network.VNI = 0 },
		"underlay": func(c *overlay.DataplaneConfig) { c.Underlay = netip.Addr{} },
		"mac":      func(c *overlay.DataplaneConfig) { c.VTEPMAC = nil },
		"mtu":      func(c *overlay.DataplaneConfig) { c.MTU = -1 },
	} {
		cfg := good
		mutate(&cfg)
		if err := l.Set(context.Background(), cfg); err == nil {
			t.Errorf("%s: Set succeeded", name)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Set(ctx, good); !errors.Is(err, context.Canceled) {
		t.Errorf("Set with a canceled context: %v", err)
	}
}

func TestIsGone(t *testing.T) {
	for _, err := range []error{
		unix.ENOENT, unix.ESRCH, unix.ENODEV, unix.EADDRNOTAVAIL,
		fmt.Errorf("%w: extack message", unix.ESRCH),
	} {
		if !isGone(err) {
			t.Errorf("isGone(%v) = false", err)
		}
	}
	for _, err := range []error{unix.EEXIST, unix.EPERM, errors.New("other")} {
		if isGone(err) {
			t.Errorf("isGone(%v) = true", err)
		}
	}
}

// addPort adds a veth pair whose first end, with the given MAC and MTU,
// is a port of the bridge br; the other end stays in the namespace.
func (ns *testNS) addPort(t testing.TB, br, name string, hw net.HardwareAddr, mtu int) {
	t.Helper()
	ns.must(t, ns.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: hw, MTU: mtu, MasterIndex: ns.link(t, br).Attrs().Index}, PeerName: name + "p"}), "add port "+name)
	ns.must(t, ns.h.LinkSetUp(ns.link(t, name)), "set "+name+" up")
}

// TestBridgeMACIsFixed: ports whose MACs sort below and above the
// bridge's come and go, and the bridge (the containers' gateway) keeps
// the MAC it was given; one set by hand is put back.
func TestBridgeMACIsFixed(t *testing.T) {
	requireRoot(t)
	a := oneHost(t)
	a.cfg.BridgeMAC = mustMAC("02:80:00:00:00:01")
	a.set(t)
	br := a.cfg.Network.BridgeName()
	check := func(when string) {
		t.Helper()
		if got := a.link(t, br).Attrs().HardwareAddr.String(); got != a.cfg.BridgeMAC.String() {
			t.Fatalf("%s: bridge MAC %s, want %s", when, got, a.cfg.BridgeMAC)
		}
	}
	check("after Set")
	a.addPort(t, br, "lo0", mustMAC("02:00:00:00:00:01"), testMTU)
	check("after a port with a lower MAC joined")
	a.addPort(t, br, "hi0", mustMAC("fe:ff:ff:ff:ff:fe"), testMTU)
	check("after a port with a higher MAC joined")
	a.must(t, a.h.LinkDel(a.link(t, "lo0")), "delete port lo0")
	check("after the port with the lowest MAC left")
	a.must(t, a.h.LinkSetHardwareAddr(a.link(t, br), mustMAC("02:00:00:00:00:99")), "change the bridge MAC by hand")
	a.set(t)
	check("after Set converged a MAC changed by hand")
}

// TestBridgeMTUFollowsPorts: after the network's MTU is raised, the
// bridge stays at the MTU of the ports created before, and rises once
// they are gone; new ports keep the raised MTU.
func TestBridgeMTUFollowsPorts(t *testing.T) {
	requireRoot(t)
	a := oneHost(t)
	a.set(t)
	br := a.cfg.Network.BridgeName()
	a.addPort(t, br, "old0", nil, testMTU)
	// The underlay's MTU rises, and with it the network's.
	a.must(t, a.h.LinkSetMTU(a.link(t, "ul0"), 9000), "raise the underlay MTU")
	a.cfg.MTU = 8950
	a.set(t)
	mtu := func() int { return a.link(t, br).Attrs().MTU }
	if got := mtu(); got != testMTU {
		t.Fatalf("bridge MTU %d with a port at %d, want %d", got, testMTU, testMTU)
	}
	if got := a.link(t, a.cfg.Network.VXLANName()).Attrs().MTU; got != 8950 {
		t.Fatalf("VXLAN MTU %d, want 8950", got)
	}
	a.addPort(t, br, "new0", nil, 8950)
	a.set(t)
	if got := mtu(); got != testMTU {
		t.Fatalf("bridge MTU %d with an old and a new port, want %d", got, testMTU)
	}
	a.must(t, a.h.LinkDel(a.link(t, "old0")), "delete the old port")
	a.set(t)
	if got := mtu(); got != 8950 {
		t.Fatalf("bridge MTU %d once the old port is gone, want 8950", got)
	}
}

// TestBridgeMTUPortLoweredByHand: a port whose MTU is lowered by hand,
// while the bridge is at the network's MTU, holds the bridge down within
// PortScanInterval, not on the next pass: listing the ports costs every
// link of the namespace.
func TestBridgeMTUPortLoweredByHand(t *testing.T) {
	requireRoot(t)
	a := oneHost(t)
	now := time.Now()
	a.dp.now = func() time.Time { return now }
	a.set(t)
	br := a.cfg.Network.BridgeName()
	a.addPort(t, br, "c0", nil, testMTU)
	a.set(t)
	a.must(t, a.h.LinkSetMTU(a.link(t, "c0"), 1300), "lower the port's MTU by hand")
	a.set(t)
	mtu := func() int { return a.link(t, br).Attrs().MTU }
	if got := mtu(); got != testMTU {
		t.Fatalf("bridge MTU %d on the next pass, want %d: the ports were listed again", got, testMTU)
	}
	now = now.Add(PortScanInterval)
	a.set(t)
	if got := mtu(); got != 1300 {
		t.Fatalf("bridge MTU %d a scan interval later, want 1300", got)
	}
	// Held: listed on every pass, so it rises as soon as the port is gone.
	a.must(t, a.h.LinkDel(a.link(t, "c0")), "delete the port")
	a.set(t)
	if got := mtu(); got != testMTU {
		t.Fatalf("bridge MTU %d once the port is gone, want %d", got, testMTU)
	}
}

// BenchmarkSetBesideContainers times a pass of a network with no
// containers on a host where another network's bridge has 300 ports: what
// each network's pass costs on a host full of containers. "listing" is
// the pass as it was before FDB dumps were filtered by the kernel and
// ports listed only when needed: it dumps the FDB of every port and
// lists every link on every pass.
func BenchmarkSetBesideContainers(b *testing.B) {
	requireRoot(b)
	a := oneHost(b)
	other := a.cfg
	other.Network = testNetwork()
	other.Network.Name, other.Network.VNI, other.Network.CIDR = "other", 4097, netip.MustParsePrefix("198.20.0.0/16")
	other.Blocks = prefixes("198.20.0.0/26")
	if err := a.dp.Set(context.Background(), other); err != nil {
		b.Fatal(err)
	}
	for i := range 300 {
		a.addPort(b, other.Network.BridgeName(), fmt.Sprintf("c%d", i), nil, testMTU)
	}
	ctx := context.Background()
	listing := New(a.h, nil, nil)
	now := time.Now()
	listing.now = func() time.Time { return now }
	for _, bc := range []struct {
		name string
		dp   *Linux
		tick time.Duration
	}{{"listing", listing, PortScanInterval}, {"now", a.dp, 0}} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				now = now.Add(bc.tick)
				if err := bc.dp.Set(ctx, a.cfg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestCheck: Check finds every entry that differs from the desired state
// (missing, different, stale, a device down or of the wrong MTU), names
// each once, and changes nothing; after Set it finds nothing.
func TestCheck(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	a := oneHost(t)
	a.cfg.Peers = []overlay.Peer{
		{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: macB, Blocks: prefixes("198.19.0.64/26")},
		{Host: "c", Underlay: netip.MustParseAddr("198.18.0.3"), VTEPMAC: macC, Blocks: prefixes("198.19.0.128/26")},
	}
	diffs, err := a.dp.Check(ctx, a.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(diffs) != 2 || diffs[0].Kind != "device" || diffs[0].Have != "" || diffs[1].Kind != "device" {
		t.Fatalf("Check before Set = %v, want the two devices missing", diffs)
	}
	a.set(t)
	if diffs, err := a.dp.Check(ctx, a.cfg); err != nil || len(diffs) != 0 {
		t.Fatalf("Check after Set = %v, %v; want nothing", diffs, err)
	}

	vx := a.link(t, a.cfg.Network.VXLANName())
	idx := vx.Attrs().Index
	// c's FDB entry goes, b's neighbour entry points elsewhere, a stale
	// route and a foreign one appear, and the device's MTU changes.
	a.must(t, a.h.NeighDel(fdbNeigh(idx, fdbEntry{MAC: mac(macC), Dst: netip.MustParseAddr("198.18.0.3")})), "delete FDB entry")
	a.must(t, a.h.NeighSet(neigh(idx, neighEntry{IP: netip.MustParseAddr("198.18.0.2"), MAC: mac{2, 0, 0, 0, 0, 9}})), "change neighbour")
	a.must(t, a.h.RouteAdd(route(idx, routeEntry{Dst: netip.MustParsePrefix("198.19.3.0/26"), Gw: netip.MustParseAddr("198.18.0.9"), OnLink: true, Proto: RouteProtocol})), "add stale route")
	a.must(t, a.h.RouteAdd(route(idx, routeEntry{Dst: netip.MustParsePrefix("198.19.4.0/26"), Gw: netip.MustParseAddr("198.18.0.9"), OnLink: true, Proto: unix.RTPROT_STATIC})), "add foreign route")
	a.must(t, a.h.LinkSetMTU(vx, 1300), "set MTU")
	before := a.snapshot(t)

	diffs, err = a.dp.Check(ctx, a.cfg)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range diffs {
		got = append(got, d.String())
	}
	slices.Sort(got)
	want := []string{
		"device differs: have " + a.cfg.Network.VXLANName() + " MTU 1300, want " + a.cfg.Network.VXLANName() + " MTU 1450",
		"fdb missing: 02:00:00:00:00:0c dst 198.18.0.3",
		"neighbour differs: have 198.18.0.2 lladdr 02:00:00:00:00:09, want 198.18.0.2 lladdr 02:00:00:00:00:0b",
		"route stale: 198.19.3.0/26 via 198.18.0.9 onlink proto 111",
	}
	if !slices.Equal(got, want) {
		t.Errorf("Check found\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if after := a.snapshot(t); after != before {
		t.Errorf("Check changed the kernel:\n%s\nwas\n%s", after, before)
	}
}
