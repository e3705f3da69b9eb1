package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/overlay"
)

func cniCode(err error) uint {
	var e *types.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// released waits until overlayd holds no address for c: DEL answers
// before the veth is deleted and the address released.
func released(t *testing.T, n *simnet.Net, c *simnet.Container) {
	t.Helper()
	eventually(t, 5*time.Second, "address of "+c.ID+" released", func() error {
		if allocated(t, n, c) {
			return fmt.Errorf("still allocated")
		}
		return nil
	})
}

// allocated reports whether overlayd still holds an address for c's eth0.
func allocated(t *testing.T, n *simnet.Net, c *simnet.Container) bool {
	t.Helper()
	return allocatedIf(t, n, c, "eth0")
}

// allocatedIf reports whether overlayd holds an address for c's ifName.
func allocatedIf(t *testing.T, n *simnet.Net, c *simnet.Container, ifName string) bool {
	t.Helper()
	_, err := cnirpc.NewClient(c.Host.Socket).Check(context.Background(), cnirpc.Request{Network: n.Network.Name, ContainerID: c.ID, IfName: ifName})
	var e *cnirpc.Error
	if errors.As(err, &e) && e.Code == cnirpc.CodeUnknownContainer {
		return false
	}
	if err != nil {
		t.Fatalf("check allocation of %s: %v", c.ID, err)
	}
	return true
}

func TestCNIDelIsIdempotent(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	c := addContainer(t, n, h, "del")
	if err := n.CheckContainer(ctx, c); err != nil {
		t.Fatalf("CHECK right after ADD: %v", err)
	}
	hostVeth := c.Result.Interfaces[0].Name
	for i := range 2 {
		if err := n.DelContainer(ctx, c); err != nil {
			t.Fatalf("DEL #%d: %v", i+1, err)
		}
	}
	released(t, n, c)
	if out := ipOut(t, h, "ip", "link", "show"); strings.Contains(out, hostVeth) {
		t.Fatalf("host veth %s left after its address was released", hostVeth)
	}

	// A container never added.
	never := &simnet.Container{ID: "never", Name: n.Prefix + "never", Host: h}
	if err := n.DelContainer(ctx, never); err != nil {
		t.Fatalf("DEL of a container never added: %v", err)
	}

	// The namespace is gone before DEL: still success, and the address
	// is released.
	gone := addContainer(t, n, h, "gone")
	if err := gone.RemoveNetNS(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.DelContainer(ctx, gone); err != nil {
		t.Fatalf("DEL with the namespace gone: %v", err)
	}
	released(t, n, gone)
}

// TestCNINetNSNotANamespace: a CNI_NETNS that exists but is not a network
// namespace (a regular file, a directory) gives code 8 naming it to ADD,
// which allocates nothing and makes no veth, and to CHECK; DEL does not
// open CNI_NETNS, so it succeeds and releases the address.
func TestCNINetNSNotANamespace(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	c := addContainer(t, n, h, "real")
	file := filepath.Join(n.Dir, "not-a-netns")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(n.Dir, "not-a-netns.d")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cni, list, err := h.CNI()
	if err != nil {
		t.Fatal(err)
	}
	wantCode8 := func(t *testing.T, verb string, err error, path, what string) {
		t.Helper()
		var e *types.Error
		if !errors.As(err, &e) || e.Code != types.ErrInvalidNetNS {
			t.Fatalf("%s with CNI_NETNS %s = %v, want code 8", verb, what, err)
		}
		if want := fmt.Sprintf("CNI_NETNS %q is not a network namespace: it is %s", path, what); e.Msg != want {
			t.Fatalf("%s with CNI_NETNS %s: message %q, want %q", verb, what, e.Msg, want)
		}
	}
	for what, path := range map[string]string{"a regular file": file, "a directory": dir} {
		t.Run(what, func(t *testing.T) {
			bogus := &simnet.Container{ID: "notnetns", Host: h}
			rc := &libcni.RuntimeConf{ContainerID: bogus.ID, NetNS: path, IfName: "eth0"}
			err := h.InNS(func() error {
				_, err := cni.AddNetworkList(ctx, list, rc)
				return err
			})
			wantCode8(t, "ADD", err, path, what)
			if allocated(t, n, bogus) {
				t.Fatal("the refused ADD allocated an address")
			}
			veth := overlay.HostVethName(n.Network.Name, overlay.AttachmentKey{ContainerID: bogus.ID, IfName: "eth0"})
			if out := ipOut(t, h, "ip", "-o", "link", "show"); strings.Contains(out, veth) {
				t.Fatalf("the refused ADD left the veth %s:\n%s", veth, out)
			}

			rc = c.RuntimeConf()
			rc.NetNS = path
			wantCode8(t, "CHECK", h.InNS(func() error { return cni.CheckNetworkList(ctx, list, rc) }), path, what)
		})
	}
	if err := n.CheckContainer(ctx, c); err != nil {
		t.Fatalf("CHECK with the right CNI_NETNS: %v", err)
	}

	rc := c.RuntimeConf()
	rc.NetNS = file
	if err := h.InNS(func() error { return cni.DelNetworkList(ctx, list, rc) }); err != nil {
		t.Fatalf("DEL with CNI_NETNS a regular file: %v", err)
	}
	released(t, n, c)
	if out := ipOut(t, h, "ip", "-o", "link", "show"); strings.Contains(out, c.Result.Interfaces[0].Name) {
		t.Fatalf("DEL with CNI_NETNS a regular file left the veth %s", c.Result.Interfaces[0].Name)
	}
}

func TestCNIAddTwiceKeepsFirstAttachment(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	c := addContainer(t, n, n.Hosts[0], "twice")
	first := c.Addr
	if err := n.Attach(ctx, c); err == nil {
		t.Fatal("second ADD of an existing interface succeeded")
	}
	if !allocated(t, n, c) {
		t.Fatal("failed second ADD released the first attachment's address")
	}
	c.Addr = first
	if err := n.CheckContainer(ctx, c); err != nil {
		t.Fatalf("first attachment broken by the failed second ADD: %v", err)
	}
}

func TestCNICheckFailsWhenAddressRemoved(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	c := addContainer(t, n, n.Hosts[0], "chk")
	if _, err := c.Exec(ctx, "ip", "addr", "del", c.Addr.String(), "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := n.CheckContainer(ctx, c); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("CHECK with the address removed = %v, want a failure naming it", err)
	}
}

func TestCNIOverlaydDown(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	if err := h.Status(ctx); err != nil {
		t.Fatalf("STATUS with overlayd running = %v, want success", err)
	}
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := h.Status(ctx); cniCode(err) != types.ErrPluginNotAvailable {
		t.Fatalf("STATUS with overlayd down = %v, want code 50", err)
	}
	_, err := n.AddContainer(ctx, h, "down")
	if cniCode(err) != types.ErrTryAgainLater {
		t.Fatalf("ADD with overlayd down = %v, want code 11", err)
	}
}

// TestCNIAddNotConfirmed: when overlayd answers an ADD early but cannot
// make the allocation durable, the plugin fails the ADD with code 11,
// removes the veth it made, and asks for the address back.
func TestCNIAddNotConfirmed(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	first := addContainer(t, n, h, "first")
	// The dataplane, bridge included, stays when overlayd stops; a
	// stand-in takes its socket.
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", h.Socket)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var ops []string
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		ops = append(ops, r.URL.Path)
		mu.Unlock()
		if !strings.HasSuffix(r.URL.Path, "/add") {
			w.Write([]byte("{}"))
			return
		}
		enc := json.NewEncoder(w)
		enc.Encode(cnirpc.Attachment{Network: n.Network.Name, Addr: netip.PrefixFrom(first.Addr.Addr().Next(), first.Addr.Bits()),
			Gateway: first.Addr.Masked().Addr().Next(), MTU: 1400, Bridge: n.Network.BridgeName(), New: true, Confirm: true})
		http.NewResponseController(w).Flush()
		enc.Encode(cnirpc.Confirmation{Err: &cnirpc.Error{Code: cnirpc.CodeTryAgainLater, Msg: "add: the allocation store failed; try again later"}})
	})}
	go srv.Serve(l)
	defer srv.Close()

	c, err := n.NewContainer(ctx, h, "lost")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Attach(ctx, c); cniCode(err) != types.ErrTryAgainLater {
		t.Fatalf("ADD whose allocation is not confirmed = %v, want code 11", err)
	}
	veth := overlay.HostVethName(n.Network.Name, overlay.AttachmentKey{ContainerID: c.ID, IfName: "eth0"})
	if out := ipOut(t, h, "ip", "-o", "link", "show"); strings.Contains(out, veth) {
		t.Fatalf("the veth %s of the failed ADD is left on the host:\n%s", veth, out)
	}
	if out, err := c.Exec(ctx, "ip", "-o", "link", "show", "eth0"); err == nil {
		t.Fatalf("the failed ADD left eth0 in the container: %s", out)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Contains(ops, "/"+cnirpc.Version+"/del") {
		t.Fatalf("the plugin did not ask for the address back: requests %v", ops)
	}
}

// TestRefusedStarts: a socket path that cannot be used, a gossip port or
// metrics address already taken, a configuration that disagrees with
// etcd, or an etcd that cannot be reached, stop overlayd at start with an
// error that says what is wrong, before it registers in etcd, leases a
// block or touches the kernel.
func TestRefusedStarts(t *testing.T) {
	n := newStoppedNet(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h1, h2 := n.Hosts[0], n.Hosts[1]
	if err := h1.Start(ctx); err != nil {
		t.Fatal(err)
	}
	notADir := filepath.Join(n.Dir, "plain-file")
	if err := os.WriteFile(notADir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Ports taken inside h2's namespace, by sockets this test holds.
	var gossipTaken, metricsTaken net.Listener
	if err := h2.InNS(func() (err error) {
		if gossipTaken, err = net.Listen("tcp", netip.AddrPortFrom(h2.Underlay, 7946).String()); err != nil {
			return err
		}
		metricsTaken, err = net.Listen("tcp", "127.0.0.1:9476")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer gossipTaken.Close()
	defer metricsTaken.Close()
	for _, tc := range []struct {
		name  string
		extra []string
		want  string
	}{
		{"socket path under a file", []string{"--socket", filepath.Join(notADir, "overlayd.sock")}, "--socket"},
		{"gossip port in use", []string{"--metrics-addr", "127.0.0.1:9477"}, "--gossip-port 7946"},
		{"metrics address in use", []string{"--gossip-port", "7947"}, "--metrics-addr"},
		{"differing vni", []string{"--vni", "9999"}, "field vni"},
		{"differing cidr", []string{"--network-cidr", "198.19.0.0/17"}, "field cidr"},
		{"etcd unreachable", []string{"--etcd-endpoints", "unix://" + n.Dir + "/nothing.sock", "--etcd-dial-timeout", "1s"}, "does not answer"},
	} {
		if !strings.Contains(tc.name, "in use") {
			// Around the ports this test holds.
			tc.extra = append(tc.extra, "--gossip-port", "7948", "--metrics-addr", "127.0.0.1:9478")
		}
		t.Run(tc.name, func(t *testing.T) { refusedStart(t, ctx, n, h2, tc.extra, tc.want) })
	}
}

// TestEtcdOutage: with etcd gone, traffic between existing containers
// keeps flowing and the dataplane keeps its peers; ADD goes on from the
// host's own record, and the new container reaches the others across the
// overlay; when etcd is back, the allocation is copied there.
func TestEtcdOutage(t *testing.T) {
	n := newNet(t, 3)
	ctx := context.Background()
	h1, h2, h3 := n.Hosts[0], n.Hosts[1], n.Hosts[2]
	a, b := pair(t, n, h2, "a", h3, "b")
	routesBefore := ipOut(t, h2, "ip", "-4", "route", "show", "dev", n.Network.VXLANName())

	// Host 1 runs the embedded etcd: stopping it takes etcd away.
	if err := h1.Stop(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Second) // more than two resync passes
	if err := a.Ping(ctx, b.Addr.Addr(), 3); err != nil {
		t.Fatalf("traffic stopped during the etcd outage: %v", err)
	}
	if got := ipOut(t, h2, "ip", "-4", "route", "show", "dev", n.Network.VXLANName()); got != routesBefore {
		t.Fatalf("routes changed during the etcd outage:\nbefore:\n%s\nafter:\n%s", routesBefore, got)
	}
	during, err := n.AddContainer(ctx, h2, "during")
	if err != nil {
		t.Fatalf("ADD during the outage: %v", err)
	}
	if during.Addr == a.Addr || during.Addr.Masked() != a.Addr.Masked() {
		t.Fatalf("ADD during the outage gave %s; a holds %s", during.Addr, a.Addr)
	}
	if err := during.Ping(ctx, b.Addr.Addr(), 1); err != nil {
		t.Fatalf("a container added during the outage does not reach another host: %v", err)
	}

	if err := h1.Start(ctx); err != nil {
		t.Fatal(err)
	}
	store := etcdStore(t, n)
	eventually(t, 30*time.Second, "the allocation made during the outage is in etcd", func() error {
		rec, err := store.Holder(ctx, n.Network, during.Addr.Addr())
		if err != nil {
			return err
		}
		if rec.ContainerID != during.ID {
			return fmt.Errorf("etcd says %s holds %s, want %s", rec.ContainerID, during.Addr, during.ID)
		}
		return nil
	})
}

// TestCNIGC: GC releases what the runtime no longer lists, removes leaked
// veths, and leaves what it lists intact.
func TestCNIGC(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	var cs []*simnet.Container
	for _, id := range []string{"keep", "stale1", "stale2"} {
		c := addContainer(t, n, h, id)
		cs = append(cs, c)
	}
	// A veth of ours that no allocation explains (a DEL that half failed).
	if _, err := h.Exec(ctx, "ip", "link", "add", "ovlleaked00000", "master", n.Network.BridgeName(), "type", "veth", "peer", "name", "leakpeer"); err != nil {
		t.Fatal(err)
	}
	if err := h.GC(ctx, cs[0]); err != nil {
		t.Fatalf("GC: %v", err)
	}
	for _, c := range cs[1:] {
		if allocated(t, n, c) {
			t.Errorf("GC kept the address of %s", c.ID)
		}
	}
	links := ipOut(t, h, "ip", "-o", "link", "show", "type", "veth")
	for _, c := range cs[1:] {
		if strings.Contains(links, c.Result.Interfaces[0].Name) {
			t.Errorf("GC kept the veth of %s", c.ID)
		}
	}
	if strings.Contains(links, "ovlleaked00000") {
		t.Error("GC kept a leaked veth")
	}
	if err := n.CheckContainer(ctx, cs[0]); err != nil {
		t.Fatalf("GC broke a valid attachment: %v", err)
	}
}

// TestCNIDelWhileOverlaydDown: DEL succeeds with overlayd down after
// removing the veth, and overlayd releases the address when it is back.
func TestCNIDelWhileOverlaydDown(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	c := addContainer(t, n, h, "orphan")
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := n.DelContainer(ctx, c); err != nil {
		t.Fatalf("DEL with overlayd down: %v", err)
	}
	if out := ipOut(t, h, "ip", "-o", "link", "show", "type", "veth"); strings.Contains(out, c.Result.Interfaces[0].Name) {
		t.Fatalf("DEL with overlayd down left the veth: %s", out)
	}
	if err := h.Start(ctx); err != nil {
		t.Fatal(err)
	}
	released(t, n, c) // after --orphan-grace
}

// TestCNICapabilitiesAndArgs: runtimeConfig.ips and .mac are honoured;
// unknown CNI_ARGS are tolerated with IgnoreUnknown and refused without.
func TestCNICapabilitiesAndArgs(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	first := addContainer(t, n, h, "first")
	want := first.Addr.Masked().Addr().Next().Next().Next().Next().Next() // block + 5
	c, err := n.NewContainer(ctx, h, "static")
	if err != nil {
		t.Fatal(err)
	}
	c.CapabilityArgs = map[string]any{"ips": []string{netip.PrefixFrom(want, first.Addr.Bits()).String()}, "mac": "02:aa:bb:cc:dd:ee"}
	c.Args = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAME", "web"}}
	if err := n.Attach(ctx, c); err != nil {
		t.Fatal(err)
	}
	if c.Addr.Addr() != want {
		t.Fatalf("got %s, asked for %s", c.Addr, want)
	}
	if out, _ := c.Exec(ctx, "ip", "link", "show", "eth0"); !strings.Contains(string(out), "02:aa:bb:cc:dd:ee") {
		t.Fatalf("MAC not honoured:\n%s", out)
	}
	if err := n.CheckContainer(ctx, c); err != nil {
		t.Fatalf("CHECK: %v", err)
	}

	// The same address for another container: refused, nothing left.
	dup, err := n.NewContainer(ctx, h, "dup")
	if err != nil {
		t.Fatal(err)
	}
	dup.CapabilityArgs = c.CapabilityArgs
	if err := n.Attach(ctx, dup); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("ADD with an address in use = %v, want a refusal saying it is in use", err)
	}
	if allocated(t, n, dup) {
		t.Fatal("refused ADD left an allocation")
	}

	bad, err := n.NewContainer(ctx, h, "badargs")
	if err != nil {
		t.Fatal(err)
	}
	bad.Args = [][2]string{{"K8S_POD_NAME", "web"}}
	if err := n.Attach(ctx, bad); cniCode(err) != types.ErrInvalidEnvironmentVariables {
		t.Fatalf("unknown CNI_ARGS without IgnoreUnknown = %v, want code 4", err)
	}
}
