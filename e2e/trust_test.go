package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/daemon"
	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// echoStream runs TCP echo round trips from client to server in the
// background. stop ends it and returns the first failure: a broken
// connection, or a round trip slower than maxRTT (the flow was cut for a
// while, even if TCP's retransmissions then hid it).
func echoStream(t *testing.T, client, server *simnet.Container, port int, maxRTT time.Duration) (rounds *atomic.Int64, stop func() error) {
	t.Helper()
	ctx := context.Background()
	l, err := server.Listen(port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	conn, err := client.Dial(ctx, netip.AddrPortFrom(server.Addr.Addr(), uint16(port)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	done := make(chan struct{})
	result := make(chan error, 1)
	rounds = new(atomic.Int64)
	go func() {
		msg := []byte(strings.Repeat("x", 1024))
		buf := make([]byte, len(msg))
		for {
			select {
			case <-done:
				result <- nil
				return
			default:
			}
			start := time.Now()
			conn.SetDeadline(start.Add(20 * time.Second))
			if _, err := conn.Write(msg); err != nil {
				result <- fmt.Errorf("write after %d rounds: %w", rounds.Load(), err)
				return
			}
			if _, err := io.ReadFull(conn, buf); err != nil {
				result <- fmt.Errorf("read after %d rounds: %w", rounds.Load(), err)
				return
			}
			if rtt := time.Since(start); rtt > maxRTT {
				result <- fmt.Errorf("round trip %d took %s: the flow was cut", rounds.Load(), rtt)
				return
			}
			rounds.Add(1)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return rounds, func() error {
		close(done)
		return <-result
	}
}

// hostVeth returns the name of c's host veth.
func hostVeth(n *simnet.Net, c *simnet.Container) string {
	return overlay.HostVethName(n.Network.Name, overlay.AttachmentKey{ContainerID: c.ID, IfName: "eth0"})
}

// TestGatewayMACSurvivesAddAndDel: containers whose host veths' MACs sort
// below and above every other are added and deleted on host 1 while a
// ping and a TCP stream run from another container there to host 2; the
// gateway's MAC never changes and nothing is lost. Before the bridge had
// a MAC of its own, the DEL of the port holding the lowest MAC cut the
// stream until the container's ARP entry aged out.
func TestGatewayMACSurvivesAddAndDel(t *testing.T) {
	n := newNet(t, 2)
	ctx := context.Background()
	h1, h2 := n.Hosts[0], n.Hosts[1]
	client, server := pair(t, n, h1, "client", h2, "server")
	bridgeMAC := func() string {
		out := ipOut(t, h1, "cat", "/sys/class/net/"+n.Network.BridgeName()+"/address")
		return strings.TrimSpace(out)
	}
	before := bridgeMAC()

	// Two containers whose host ends take the lowest and the highest MAC
	// on the bridge; the client then learns the gateway's MAC afresh, as
	// it would once its entry aged out.
	low := addContainer(t, n, h1, "low")
	high := addContainer(t, n, h1, "high")
	ipOut(t, h1, "ip", "link", "set", "dev", hostVeth(n, low), "address", "02:00:00:00:00:01")
	ipOut(t, h1, "ip", "link", "set", "dev", hostVeth(n, high), "address", "fe:ff:ff:ff:ff:fe")
	if _, err := client.Exec(ctx, "ip", "neigh", "flush", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := client.Ping(ctx, server.Addr.Addr(), 1); err != nil {
		t.Fatal(err)
	}

	rounds, stop := echoStream(t, client, server, 5002, time.Second)
	pinged := make(chan error, 1)
	go func() {
		// 40 pings 50 ms apart, each given a second: any lost one fails.
		out, err := client.Exec(ctx, "ping", "-n", "-q", "-i", "0.05", "-c", "40", "-W", "1", server.Addr.Addr().String())
		if err == nil && !strings.Contains(string(out), " 0% packet loss") {
			err = fmt.Errorf("pings lost:\n%s", out)
		}
		pinged <- err
	}()
	time.Sleep(200 * time.Millisecond)
	for _, c := range []*simnet.Container{low, high} {
		if err := n.DelContainer(ctx, c); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	again := addContainer(t, n, h1, "again")
	ipOut(t, h1, "ip", "link", "set", "dev", hostVeth(n, again), "address", "02:00:00:00:00:02")
	time.Sleep(200 * time.Millisecond)
	if err := n.DelContainer(ctx, again); err != nil {
		t.Fatal(err)
	}
	if err := <-pinged; err != nil {
		t.Errorf("ping while containers came and went: %v", err)
	}
	if err := stop(); err != nil {
		t.Errorf("TCP stream while containers came and went: %v", err)
	}
	if after := bridgeMAC(); after != before {
		t.Errorf("gateway MAC changed from %s to %s", before, after)
	}
	t.Logf("%d echo round trips; gateway MAC %s throughout", rounds.Load(), before)
}

// etcdStore returns the store of n's etcd, closed when the test ends.
func etcdStore(t *testing.T, n *simnet.Net) *etcd.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	store, closeStore, err := n.Store(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeStore() })
	return store
}

// hostRecords returns the host IDs registered in etcd and the owners of
// the network's blocks.
func hostRecords(t *testing.T, n *simnet.Net) (hosts []overlay.HostID, owners map[netip.Prefix]overlay.HostID) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	store := etcdStore(t, n)
	recs, err := store.Hosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		hosts = append(hosts, r.Host)
	}
	network, err := store.Network(ctx, n.Network.Name)
	if err != nil {
		t.Fatal(err)
	}
	if owners, err = store.Pool(network, "").Owners(ctx); err != nil {
		t.Fatal(err)
	}
	return hosts, owners
}

// refusedStart runs overlayd on h with extra flags and checks that it
// refuses to start with an error containing want, and changes nothing: no
// device, no forwarding, no host record or block in etcd.
func refusedStart(t *testing.T, ctx context.Context, n *simnet.Net, h *simnet.Host, extra []string, want string) {
	t.Helper()
	hostsBefore, ownersBefore := hostRecords(t, n)
	args := append(append([]string{bins.overlayd}, h.Args()...), extra...)
	out, err := h.Exec(ctx, args...)
	if err == nil {
		t.Fatalf("overlayd started:\n%s", out)
	}
	if !strings.Contains(string(out), want) {
		t.Fatalf("error does not say %q:\n%s", want, out)
	}
	links := ipOut(t, h, "ip", "-o", "link", "show")
	if strings.Contains(links, n.Network.BridgeName()) || strings.Contains(links, n.Network.VXLANName()) {
		t.Fatalf("refused start changed the kernel:\n%s", links)
	}
	if fwd := ipOut(t, h, "cat", "/proc/sys/net/ipv4/ip_forward"); strings.TrimSpace(fwd) != "0" {
		t.Fatalf("refused start turned on forwarding")
	}
	hosts, owners := hostRecords(t, n)
	if fmt.Sprint(hosts) != fmt.Sprint(hostsBefore) || fmt.Sprint(owners) != fmt.Sprint(ownersBefore) {
		t.Fatalf("refused start changed etcd: hosts %v (was %v), blocks %v (was %v)", hosts, hostsBefore, owners, ownersBefore)
	}
}

// TestTeardownRefusesRunningOverlayd: teardown refuses to touch the
// devices of an overlayd that is running, whatever data directory and
// socket it is given.
func TestTeardownRefusesRunningOverlayd(t *testing.T) {
	n := newNet(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h1 := n.Hosts[0]
	// Another data directory with an identity of its own, and a
	// socket nobody serves: only the namespace's lock stops it.
	other := filepath.Join(n.Dir, "other")
	if err := os.MkdirAll(other, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := daemon.LoadIdentity(other); err != nil {
		t.Fatal(err)
	}
	args := []string{bins.overlayd, "teardown", "--data-dir", other, "--socket", filepath.Join(other, "none.sock"),
		"--etcd-endpoints", n.EtcdEndpoint(), "--network", n.Network.Name}
	out, err := h1.Exec(ctx, args...)
	if err == nil || !strings.Contains(string(out), "is running") {
		t.Fatalf("teardown beside a running overlayd = %v:\n%s", err, out)
	}
	links := ipOut(t, h1, "ip", "-o", "link", "show")
	if !strings.Contains(links, n.Network.BridgeName()) || !strings.Contains(links, n.Network.VXLANName()) {
		t.Fatalf("teardown removed the devices of a running overlayd:\n%s", links)
	}
}

// startupRE finds the start-up time in overlayd's "ready" log line.
var startupRE = regexp.MustCompile(`msg=ready .*startup=([0-9.]+m?s)`)

// TestDeadHostsDoNotDelayStart: two registered hosts that no longer exist
// (their gossip addresses answer nothing) do not hold up a restart: it is
// ready in its usual time and serves ADD at once, and the join that
// contacts them ends after the start. Before, a start joined every
// registered host first and waited for each to time out (3.1 s here).
func TestDeadHostsDoNotDelayStart(t *testing.T) {
	n := newNet(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h2 := n.Hosts[1]
	if _, err := simnet.RegisterGoneHosts(ctx, etcdStore(t, n), 2); err != nil {
		t.Fatal(err)
	}
	if err := h2.Stop(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := h2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	ready := time.Since(start)
	if _, err := n.AddContainer(ctx, h2, "right-away"); err != nil {
		t.Fatalf("ADD right after the start: %v", err)
	}
	// A clean restart takes tens of milliseconds here; waiting for the
	// dead hosts took 3 s or more.
	if ready > 2*time.Second {
		t.Fatalf("start to ready took %s with two dead hosts registered", ready)
	}
	// The join that contacted them ends after the start, not before it.
	logPath := filepath.Join(h2.DataDir, "overlayd.log")
	var startup string
	eventually(t, 30*time.Second, "the join of the dead hosts to end", func() error {
		logs, _ := os.ReadFile(logPath)
		lines := strings.Split(string(logs), "\n")
		lastReady := -1
		for i, l := range lines {
			if strings.Contains(l, "msg=ready") {
				lastReady = i
				if m := startupRE.FindStringSubmatch(l); m != nil {
					startup = m[1]
				}
			}
		}
		for _, l := range lines[lastReady+1:] {
			// All three contacted (the live one answered), or, when the
			// live one had joined this host first, the two dead ones
			// (none answered).
			if strings.Contains(l, `msg="joined gossip"`) && strings.Contains(l, "of=3") ||
				strings.Contains(l, `msg="no registered host answered gossip; will retry"`) && strings.Contains(l, "hosts=2") {
				return nil
			}
		}
		return fmt.Errorf("no join of the dead registered hosts logged after the last ready line")
	})
	t.Logf("start to ready %s; overlayd's own figure %s", ready.Round(time.Millisecond), startup)
}

// TestStaticAddressFreeWhenDelReturns: a runtime that recreates a
// container with its static address (CNI "ips") right after DEL gets it.
func TestStaticAddressFreeWhenDelReturns(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	first := addContainer(t, n, h, "first")
	ips := map[string]any{"ips": []string{first.Addr.String()}}
	for i := range 5 {
		if err := n.DelContainer(ctx, first); err != nil {
			t.Fatal(err)
		}
		next, err := n.NewContainer(ctx, h, fmt.Sprintf("again%d", i))
		if err != nil {
			t.Fatal(err)
		}
		next.CapabilityArgs = ips
		if err := n.Attach(ctx, next); err != nil {
			t.Fatalf("round %d: ADD of the static address right after DEL: %v", i, err)
		}
		if next.Addr != first.Addr {
			t.Fatalf("round %d: got %s, asked for %s", i, next.Addr, first.Addr)
		}
		first = next
	}
}

// TestMTUChangeReachesAttachments: the underlay's MTU rises and overlayd
// restarts. The VXLAN device follows; the bridge stays at the MTU of the
// containers created before, so that a packet too large for them gets an
// ICMP error rather than a silent drop; a new container gets the new MTU;
// CHECK fails for the old one, saying to recreate it; and the log names
// it.
func TestMTUChangeReachesAttachments(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	old := addContainer(t, n, h, "old")
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	ipOut(t, h, "ip", "link", "set", "dev", "eth0", "mtu", "9000")
	if err := h.Start(ctx); err != nil {
		t.Fatal(err)
	}
	mtu := func(dev string) string {
		return strings.TrimSpace(ipOut(t, h, "cat", "/sys/class/net/"+dev+"/mtu"))
	}
	if got := mtu(n.Network.VXLANName()); got != "8950" {
		t.Errorf("VXLAN MTU %s after the underlay went to 9000, want 8950", got)
	}
	if got := mtu(n.Network.BridgeName()); got != "1450" {
		t.Errorf("bridge MTU %s with a container at 1450, want 1450", got)
	}
	fresh := addContainer(t, n, h, "fresh")
	if got := fresh.Result.Interfaces[1].Mtu; got != 8950 {
		t.Errorf("new container's MTU %d, want 8950", got)
	}
	if err := n.CheckContainer(ctx, fresh); err != nil {
		t.Errorf("CHECK of the new container: %v", err)
	}
	if err := n.CheckContainer(ctx, old); err == nil || !strings.Contains(err.Error(), "recreate the container") {
		t.Errorf("CHECK of the container created before = %v, want a failure saying to recreate it", err)
	}
	logs, _ := os.ReadFile(filepath.Join(h.DataDir, "overlayd.log"))
	if !strings.Contains(string(logs), "containers created before the MTU changed") || !strings.Contains(string(logs), old.ID+"/eth0") {
		t.Errorf("the log does not name the container to recreate:\n%s", logs)
	}
	// Once the old container is gone, the bridge rises.
	if err := n.DelContainer(ctx, old); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the bridge to rise to the network's MTU", func() error {
		if got := mtu(n.Network.BridgeName()); got != "8950" {
			return fmt.Errorf("bridge MTU %s", got)
		}
		return nil
	})
}

// TestStalledSocketClientsDoNotStallADD: thousands of clients hold
// connections to overlayd's socket, half of them having sent nothing and
// half having stalled in the middle of a request body; ADD and DEL still
// answer, each within a second, and overlayd keeps within its connection
// cap. Before, such clients were held forever, and 20,000 of them used up
// overlayd's file descriptors and stalled an ADD for 29 s.
func TestStalledSocketClientsDoNotStallADD(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	const stalled = 3000
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range stalled {
		c, err := net.Dial("unix", h.Socket)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
		if i%2 == 1 {
			fmt.Fprintf(c, "POST /%s/add HTTP/1.1\r\nHost: overlayd\r\nContent-Length: 100\r\n\r\n{\"net", cnirpc.Version)
		}
	}
	// Longer than the time after which a silent client may be cut to make
	// room for a new one.
	time.Sleep(1500 * time.Millisecond)
	for i := range 5 {
		start := time.Now()
		c, err := n.AddContainer(ctx, h, fmt.Sprintf("busy%d", i))
		if err != nil {
			t.Fatalf("ADD %d with %d stalled clients: %v", i, stalled, err)
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("ADD %d took %s with %d stalled clients", i, took, stalled)
		}
		start = time.Now()
		if err := n.DelContainer(ctx, c); err != nil {
			t.Fatalf("DEL %d: %v", i, err)
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("DEL %d took %s with %d stalled clients", i, took, stalled)
		}
	}
	pid := strings.TrimSpace(ipOut(t, h, "pgrep", "-f", "--", "--data-dir "+h.DataDir+" "))
	out := ipOut(t, h, "sh", "-c", "ls /proc/"+pid+"/fd | wc -l")
	if fds, _ := strconv.Atoi(strings.TrimSpace(out)); fds > 1200 {
		t.Errorf("overlayd holds %d file descriptors with %d clients waiting: the connection cap does not hold", fds, stalled)
	}
}
