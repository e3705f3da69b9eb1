package etcd_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/overlaynet/overlay/internal/etcdtest"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/etcd/embedded"
	"github.com/overlaynet/overlay/overlay"
)

// The bounds the daemon puts on its etcd work: a reconcile pass reads the
// block owners within ownersBound, a mirror pass writes within
// mirrorBound.
const (
	ownersBound = 3 * time.Second
	mirrorBound = 10 * time.Second
)

// recoveryBound is how soon after etcd is healthy again every host's next
// reconcile read and mirror write must have succeeded.
const recoveryBound = time.Second

// During an outage, operations are bounded by outageCallBound and must
// fail within outageBound: the bound and some slack, never a hang.
const (
	outageCallBound = time.Second
	outageBound     = outageCallBound + 500*time.Millisecond
)

// outage is how long etcd stays away. It is long enough for gRPC's default
// reconnect backoff (1 s, growing by 1.6 per failed attempt) to have grown
// to several seconds, which is what kept a host failing after the cluster
// was back.
const outage = 10 * time.Second

// member is one member of an embedded test cluster.
type member struct {
	name      string
	dir       string
	clientURL string
	peerURL   string
	cluster   string // the initial-cluster flag: every member's name=peerURL

	e *embed.Etcd // nil while stopped
}

func (m *member) start() error {
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = filepath.Join(m.dir, "data")
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cu, err := url.Parse(m.clientURL)
	if err != nil {
		return err
	}
	pu, err := url.Parse(m.peerURL)
	if err != nil {
		return err
	}
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = m.cluster
	cfg.InitialClusterToken = "overlay-quorum-test"
	cfg.ClusterState = embed.ClusterStateFlagNew // ignored on a restart: the data directory says
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("start %s: %w", m.name, err)
	}
	m.e = e
	return nil
}

func (m *member) stop() {
	if m.e != nil {
		m.e.Close()
		m.e = nil
	}
}

// startCluster starts an embedded cluster of n members: clients on Unix
// sockets, peers on loopback ports. Cleanup stops every member.
func startCluster(t *testing.T, n int) []*member {
	t.Helper()
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	var ms []*member
	var cluster []string
	for i, l := range ls {
		dir, err := os.MkdirTemp("", "ovl-quorum-") // short: socket paths have a length limit
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		m := &member{
			name:      fmt.Sprintf("m%d", i),
			dir:       dir,
			clientURL: "unix://" + filepath.Join(dir, "client.sock"),
			peerURL:   "http://" + l.Addr().String(),
		}
		l.Close()
		ms = append(ms, m)
		cluster = append(cluster, m.name+"="+m.peerURL)
	}
	t.Cleanup(func() { stopMembers(ms...) })
	for _, m := range ms {
		m.cluster = strings.Join(cluster, ",")
		if err := m.start(); err != nil {
			t.Fatal(err)
		}
	}
	waitHealthy(t, ms)
	return ms
}

// stopMembers stops ms at once, as a power failure would.
func stopMembers(ms ...*member) {
	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Go(m.stop)
	}
	wg.Wait()
}

// waitHealthy waits until every running member is ready and all agree on
// a leader, and returns when that was first seen.
func waitHealthy(t *testing.T, ms []*member) time.Time {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		healthy := true
		var leader uint64
		for _, m := range ms {
			if m.e == nil {
				continue
			}
			select {
			case <-m.e.Server.ReadyNotify():
			default:
				healthy = false
			}
			l := uint64(m.e.Server.Leader())
			if l == 0 || (leader != 0 && l != leader) {
				healthy = false
			}
			leader = l
		}
		if healthy {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatal("etcd cluster not healthy after 30s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// host is what one overlayd keeps of etcd: its own client and its pool.
type host struct {
	name  string
	pool  *etcd.Pool
	block netip.Prefix
	next  int // how many allocations the next call of allocs returns
}

// newHost connects to endpoints as one host would, leases a block and
// mirrors one allocation, so that later mirror passes have work to do.
func newHost(t *testing.T, name string, endpoints []string) *host {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), mirrorBound)
	defer cancel()
	cli, err := etcd.Connect(ctx, etcd.ClientConfig{Endpoints: endpoints})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	ensureNetwork(t, cli, "")
	h := &host{name: name, pool: etcd.NewStore(cli, "").Pool(testNetwork(), overlay.HostID(name)), next: 2}
	blocks, err := h.pool.Lease(ctx)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	h.block = blocks[0]
	if _, err := h.pool.Mirror(ctx, h.allocs()); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return h
}

// allocs returns the host's allocations after one more ADD, so that a
// mirror pass always has a key to write.
func (h *host) allocs() []overlay.Allocation {
	var out []overlay.Allocation
	a := h.block.Addr().Next()
	for i := 1; i <= h.next; i++ {
		out = append(out, overlay.Allocation{
			Key:  overlay.AttachmentKey{ContainerID: fmt.Sprintf("c%d", i), IfName: "eth0"},
			Addr: netip.PrefixFrom(a, h.block.Bits()),
			Host: overlay.HostID(h.name),
		})
		a = a.Next()
	}
	h.next++
	return out
}

// result is how one host's operation went, timed from a reference point.
type result struct {
	host, op string
	took     time.Duration
	err      error
}

// eachHost makes, for every host at once, a reconcile read bounded by
// ownersCtx and a mirror write bounded by mirrorCtx, and returns how each
// went, timed from start.
func eachHost(hosts []*host, start time.Time, ownersCtx, mirrorCtx time.Duration) []result {
	var mu sync.Mutex
	var out []result
	var wg sync.WaitGroup
	add := func(r result) {
		mu.Lock()
		defer mu.Unlock()
		out = append(out, r)
	}
	for _, h := range hosts {
		want := h.allocs()
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), ownersCtx)
			defer cancel()
			_, err := h.pool.Owners(ctx)
			add(result{host: h.name, op: "owners", took: time.Since(start), err: err})
		})
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), mirrorCtx)
			defer cancel()
			_, err := h.pool.Mirror(ctx, want)
			add(result{host: h.name, op: "mirror", took: time.Since(start), err: err})
		})
	}
	wg.Wait()
	return out
}

// checkOutage checks that, with etcd away, every host's operations fail
// within their bound instead of hanging.
func checkOutage(t *testing.T, hosts []*host) {
	t.Helper()
	for _, r := range eachHost(hosts, time.Now(), outageCallBound, outageCallBound) {
		if r.err == nil {
			t.Errorf("%s: %s succeeded without a quorum", r.host, r.op)
		}
		if r.took > outageBound {
			t.Errorf("%s: %s took %s to fail with a bound of %s", r.host, r.op, r.took.Round(time.Millisecond), outageCallBound)
		}
	}
}

// checkRecovered checks that every host's next reconcile read and mirror
// write, started when etcd was healthy again (healthy), succeed within
// recoveryBound.
func checkRecovered(t *testing.T, hosts []*host, healthy time.Time) {
	t.Helper()
	var worst time.Duration
	for _, r := range eachHost(hosts, healthy, ownersBound, mirrorBound) {
		worst = max(worst, r.took)
		if r.err != nil || r.took > recoveryBound {
			t.Errorf("%s: the first %s after etcd was healthy again took %s (want at most %s): %v", r.host, r.op, r.took.Round(time.Millisecond), recoveryBound, r.err)
		}
	}
	t.Logf("the last of the hosts' first reconcile reads and mirror writes ended %s after etcd was healthy", worst.Round(time.Millisecond))
}

// TestClientsRecoverAfterQuorumLoss stops two members of three for a
// while and restarts them: every host's next reconcile read and mirror
// write after the cluster is healthy again must succeed within a second,
// whether its endpoints include the member that stayed up or not.
func TestClientsRecoverAfterQuorumLoss(t *testing.T) {
	t.Parallel() // mostly waiting out the outage
	ms := startCluster(t, 3)
	ep := func(is ...int) []string {
		var out []string
		for _, i := range is {
			out = append(out, ms[i].clientURL)
		}
		return out
	}
	hosts := []*host{
		newHost(t, "all", ep(0, 1, 2)),
		newHost(t, "on-m0", ep(0)), // the member that stays up
		newHost(t, "on-m1", ep(1)),
		newHost(t, "on-m2", ep(2)),
		newHost(t, "on-m1-m2", ep(1, 2)),
	}

	stopped := time.Now()
	stopMembers(ms[1], ms[2])
	checkOutage(t, hosts)
	time.Sleep(time.Until(stopped.Add(outage)))

	var wg sync.WaitGroup
	errs := make([]error, len(ms))
	for _, i := range []int{1, 2} {
		wg.Go(func() { errs[i] = ms[i].start() })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	checkRecovered(t, hosts, waitHealthy(t, ms))
}

// TestClientsRecoverAfterEmbeddedRestart stops the embedded etcd for a
// while and starts it again on the same directory and sockets.
func TestClientsRecoverAfterEmbeddedRestart(t *testing.T) {
	t.Parallel()
	cfg := etcdtest.Config(t)
	ctx := context.Background()
	e, err := embedded.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if e != nil {
			e.Close()
		}
	})
	var hosts []*host
	for i := range 3 {
		hosts = append(hosts, newHost(t, fmt.Sprintf("h%d", i), []string{cfg.ClientURL}))
	}

	stopped := time.Now()
	e.Close()
	e = nil
	checkOutage(t, hosts)
	time.Sleep(time.Until(stopped.Add(outage)))

	if e, err = embedded.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	checkRecovered(t, hosts, time.Now())
}
