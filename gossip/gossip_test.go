package gossip

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/overlaynet/overlay/overlay"
)

// waitTimeout bounds every wait for the cluster to converge. Convergence
// takes well under a second with testTiming; the margin is for -race on a
// loaded machine.
const waitTimeout = 15 * time.Second

// testTiming makes failure detection and convergence take a fraction of
// a second.
func testTiming(cfg *Config) {
	cfg.ProbeInterval = 100 * time.Millisecond
	cfg.ProbeTimeout = 50 * time.Millisecond
	cfg.GossipInterval = 20 * time.Millisecond
	cfg.PushPullInterval = 500 * time.Millisecond
	cfg.TCPTimeout = time.Second
	cfg.LeaveTimeout = 2 * time.Second
}

// testLog collects log output; the test prints it when it fails. Unlike
// t.Log, it may be written after the test ends, as memberlist's
// goroutines outlive Shutdown by a little.
type testLog struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *testLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func newTestLog(t *testing.T) *testLog {
	l := new(testLog)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", l)
		}
	})
	return l
}

// mockNet is a memberlist.MockNetwork whose transports behave like UDP:
// a send never blocks. MockTransport hands every packet over an
// unbuffered channel, so two members acking each other's pings at the
// same time deadlock their receive loops, and a member sending to a
// shut-down one blocks forever. Here a pump per transport takes every
// packet at once and queues it for memberlist, dropping it when the queue
// is full or the member is shut down. When the test ends, the pumps go on
// until the network has been quiet for drainQuiet, so that the sends
// memberlist had in flight at Shutdown complete and its goroutines exit.
type mockNet struct {
	net  memberlist.MockNetwork
	stop chan struct{} // closed when the test ends
	wg   sync.WaitGroup
}

// drainQuiet is how long a pump must see no traffic after the test ends
// before it stops: longer than a probe round of testTiming.
const drainQuiet = 300 * time.Millisecond

// pumpQueue is how many packets or connections a member may have waiting.
const pumpQueue = 1024

func newMockNet(t *testing.T) *mockNet {
	n := &mockNet{stop: make(chan struct{})}
	t.Cleanup(func() {
		close(n.stop)
		n.wg.Wait()
	})
	return n
}

// transport returns a new transport for the node named name. MockNetwork
// is not safe for concurrent use: create every transport of a test before
// starting any member.
func (n *mockNet) transport(name string) *pumpTransport {
	p := &pumpTransport{
		MockTransport: n.net.NewTransport(name),
		packets:       make(chan *memberlist.Packet, pumpQueue),
		streams:       make(chan net.Conn, pumpQueue),
		down:          make(chan struct{}),
	}
	n.wg.Go(func() { p.pump(n.stop) })
	return p
}

type pumpTransport struct {
	*memberlist.MockTransport
	packets chan *memberlist.Packet
	streams chan net.Conn
	once    sync.Once
	down    chan struct{} // closed by Shutdown
}

func (p *pumpTransport) PacketCh() <-chan *memberlist.Packet { return p.packets }
func (p *pumpTransport) StreamCh() <-chan net.Conn           { return p.streams }

func (p *pumpTransport) Shutdown() error {
	p.once.Do(func() { close(p.down) })
	return nil
}

// pump is the only writer of p.packets and p.streams.
func (p *pumpTransport) pump(stop <-chan struct{}) {
	var (
		down   = p.down
		isDown bool
		quiet  <-chan time.Time // armed once the test ends
	)
	for {
		select {
		case pkt := <-p.MockTransport.PacketCh():
			if !isDown {
				select {
				case p.packets <- pkt:
				default:
				}
			}
		case c := <-p.MockTransport.StreamCh():
			if isDown {
				c.Close()
				break
			}
			select {
			case p.streams <- c:
			default:
				c.Close()
			}
		case <-down:
			isDown, down = true, nil
			// memberlist may still be reading p.streams: never block.
			for drained := false; !drained; {
				select {
				case c := <-p.streams:
					c.Close()
				default:
					drained = true
				}
			}
		case <-stop:
			stop = nil
		case <-quiet:
			return
		}
		if stop == nil {
			quiet = time.After(drainQuiet)
		}
	}
}

// member is a Gossip under test with a count of its OnChange calls.
type member struct {
	*Gossip
	changes atomic.Int64
	log     *testLog
}

func hostName(i int) overlay.HostID { return overlay.HostID(fmt.Sprintf("host-%d", i)) }

func underlay(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}) }

func mac(i int) net.HardwareAddr { return net.HardwareAddr{0x02, 0, 0, 0, 0, byte(i + 1)} }

// newMember starts host i on transport tr, or on loopback when tr is nil,
// and shuts it down when the test ends.
func newMember(t *testing.T, i int, tr memberlist.Transport, opts ...func(*Config)) *member {
	t.Helper()
	m := &member{log: newTestLog(t)}
	cfg := DefaultConfig()
	testTiming(&cfg)
	for _, o := range opts {
		o(&cfg)
	}
	cfg.Host = hostName(i)
	cfg.Underlay = underlay(i)
	cfg.VTEPMAC = mac(i)
	cfg.Logger = slog.New(slog.NewTextHandler(m.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.OnChange = func() { m.changes.Add(1) }
	if tr != nil {
		cfg.Transport = tr
	} else {
		cfg.BindAddr = netip.MustParseAddr("127.0.0.1")
		cfg.BindPort = 0
	}
	g, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%s): %v", cfg.Host, err)
	}
	m.Gossip = g
	t.Cleanup(func() {
		if err := g.Shutdown(); err != nil {
			t.Errorf("Shutdown(%s): %v", cfg.Host, err)
		}
	})
	return m
}

// newCluster starts n members on a MockNetwork and joins them through the
// first.
func newCluster(t *testing.T, n int) []*member {
	t.Helper()
	mn := newMockNet(t)
	trs := make([]*pumpTransport, n)
	for i := range n {
		trs[i] = mn.transport(string(hostName(i)))
	}
	ms := make([]*member, n)
	for i := range n {
		ms[i] = newMember(t, i, trs[i])
	}
	for _, m := range ms[1:] {
		joined, err := m.Join(t.Context(), []string{ms[0].LocalAddr().String()})
		if err != nil || joined != 1 {
			t.Fatalf("Join = %d, %v; want 1, nil", joined, err)
		}
	}
	return ms
}

// waitFor polls cond until it holds or waitTimeout passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", waitTimeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// hosts returns the host IDs of ms.
func hosts(ms []overlay.Member) []overlay.HostID {
	var out []overlay.HostID
	for _, m := range ms {
		out = append(out, m.Host)
	}
	return out
}

// expected is what the others see of host i.
func expected(i int) overlay.Member {
	return overlay.Member{Host: hostName(i), Underlay: underlay(i), VTEPMAC: mac(i)}
}

func TestMembersSeeEachOther(t *testing.T) {
	ms := newCluster(t, 3)
	for i, m := range ms {
		var want []overlay.Member
		for j := range ms {
			if j != i {
				want = append(want, expected(j))
			}
		}
		waitFor(t, fmt.Sprintf("%s to see the others", hostName(i)), func() bool {
			return reflect.DeepEqual(m.Members(), want)
		})
		if got := m.NumMembers(); got != 3 {
			t.Errorf("%s: NumMembers = %d, want 3", hostName(i), got)
		}
		if got, want := membership(m.Stats()), (Stats{Members: 2}); got != want {
			t.Errorf("%s: Stats = %+v, want %+v", hostName(i), got, want)
		}
		if m.changes.Load() == 0 {
			t.Errorf("%s: OnChange was never called", hostName(i))
		}
	}

	// Members returns copies.
	got := ms[0].Members()
	got[0].VTEPMAC[0] = 0xff
	if again := ms[0].Members(); !reflect.DeepEqual(again[0], expected(1)) {
		t.Errorf("changing the result of Members changed the state: %+v", again[0])
	}

	// Joining only ourselves is a no-op, not an error.
	if n, err := ms[0].Join(t.Context(), []string{ms[0].LocalAddr().String()}); n != 0 || err != nil {
		t.Errorf("Join(self) = %d, %v; want 0, nil", n, err)
	}
}

// TestMetaSizeLimit: New refuses a host ID too long for the metadata to
// fit in memberlist.MetaMaxSize bytes, and accepts one that just fits.
func TestMetaSizeLimit(t *testing.T) {
	empty, err := encodeMeta(overlay.Member{Underlay: underlay(0), VTEPMAC: mac(0)})
	if err != nil {
		t.Fatal(err)
	}
	fits := memberlist.MetaMaxSize - len(empty)
	for _, tc := range []struct {
		hostLen int
		wantErr error
	}{
		{fits, nil},
		{fits + 1, ErrMetaTooLarge},
		{memberlist.MetaMaxSize, ErrMetaTooLarge},
	} {
		cfg := DefaultConfig()
		testTiming(&cfg)
		cfg.Host = overlay.HostID(strings.Repeat("h", tc.hostLen))
		cfg.Underlay = underlay(0)
		cfg.VTEPMAC = mac(0)
		cfg.BindAddr = netip.MustParseAddr("127.0.0.1")
		cfg.BindPort = 0
		g, err := New(cfg)
		if err == nil {
			if meta := (delegate{g}).NodeMeta(memberlist.MetaMaxSize); len(meta) != len(empty)+tc.hostLen {
				t.Errorf("host ID of %d bytes: NodeMeta is %d bytes, want %d", tc.hostLen, len(meta), len(empty)+tc.hostLen)
			}
			if err := g.Shutdown(); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
		}
		if !errors.Is(err, tc.wantErr) {
			t.Errorf("New(host ID of %d bytes) = %v, want %v", tc.hostLen, err, tc.wantErr)
		}
	}
}

// rawDelegate is a memberlist.Delegate whose metadata the test sets.
type rawDelegate struct {
	mu   sync.Mutex // guards meta
	meta []byte
}

func (d *rawDelegate) set(meta string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.meta = []byte(meta)
}

func (d *rawDelegate) NodeMeta(limit int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.meta
}
func (*rawDelegate) NotifyMsg([]byte)                {}
func (*rawDelegate) GetBroadcasts(int, int) [][]byte { return nil }
func (*rawDelegate) LocalState(bool) []byte          { return nil }
func (*rawDelegate) MergeRemoteState([]byte, bool)   {}

func TestMalformedMetaIgnored(t *testing.T) {
	mn := newMockNet(t)
	const rawName = "raw"
	goodTr, rawTr := mn.transport(string(hostName(0))), mn.transport(rawName)
	good := newMember(t, 0, goodTr)

	d := &rawDelegate{meta: []byte("\x00\xffgarbage")}
	rc := memberlist.DefaultLANConfig()
	rc.Name = rawName
	rc.Transport = rawTr
	rc.Delegate = d
	rc.Logger = log.New(io.Discard, "", 0)
	rc.ProbeInterval, rc.ProbeTimeout = 100*time.Millisecond, 50*time.Millisecond
	rc.GossipInterval, rc.PushPullInterval = 20*time.Millisecond, 500*time.Millisecond
	raw, err := memberlist.Create(rc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Shutdown() })
	if _, err := raw.Join([]string{good.LocalAddr().String()}); err != nil {
		t.Fatal(err)
	}

	// valid is metadata as the previous release writes it, with the
	// blocks this release ignores.
	valid := func(host string) string {
		return `{"v":1,"h":"` + host + `","u":"198.18.0.9","m":"02:00:00:00:00:09","b":{"default":["198.19.9.0/26"]}}`
	}
	bad := []string{
		"\x00\xffgarbage", // sent when joining
		`{"v":2,"h":"raw","u":"198.18.0.9","m":"02:00:00:00:00:09"}`,
		`{"v":1,"h":"raw","u":"198.18.0.999","m":"02:00:00:00:00:09"}`,
		`{"v":1,"h":"raw","u":"198.18.0.9","m":"02:00:00:00:09"}`,
		`{"v":1,"h":"raw","u":"198.18.0.9","m":"02:00:00:00:00:09","x":1}`,
		valid("someone-else"), // host ID differs from node name
	}
	for i, meta := range bad {
		if i > 0 {
			d.set(meta)
			if err := raw.UpdateNode(2 * time.Second); err != nil {
				t.Fatalf("UpdateNode: %v", err)
			}
		}
		want := Stats{Rejected: 1, RejectedMetas: uint64(i + 1)}
		waitFor(t, fmt.Sprintf("rejection of %q", meta), func() bool {
			return membership(good.Stats()) == want
		})
		if got := good.Members(); len(got) != 0 {
			t.Fatalf("metadata %q: Members = %+v, want none", meta, got)
		}
	}
	if got := good.NumMembers(); got != 2 {
		t.Errorf("NumMembers = %d, want 2: a rejected member is still a memberlist node", got)
	}
	if warns := strings.Count(good.log.String(), "ignoring member with invalid metadata"); warns != len(bad) {
		t.Errorf("logged %d warnings, want one per invalid metadata (%d)", warns, len(bad))
	}

	// Valid metadata brings the member in.
	d.set(valid(rawName))
	if err := raw.UpdateNode(2 * time.Second); err != nil {
		t.Fatalf("UpdateNode: %v", err)
	}
	want := overlay.Member{
		Host:     rawName,
		Underlay: netip.MustParseAddr("198.18.0.9"),
		VTEPMAC:  net.HardwareAddr{0x02, 0, 0, 0, 0, 0x09},
	}
	waitFor(t, "the member with valid metadata", func() bool {
		got := good.Members()
		return len(got) == 1 && reflect.DeepEqual(got[0], want)
	})
	if got, want := membership(good.Stats()), (Stats{Members: 1, RejectedMetas: uint64(len(bad))}); got != want {
		t.Errorf("Stats = %+v, want %+v", got, want)
	}

	// A host of the previous release updates its blocks, here to a list
	// this release would once have refused: the update arrives, and the
	// blocks, whatever they say, are ignored. memberlist calls
	// NotifyUpdate holding the lock its Members takes, so once it lists
	// the new metadata, update has run.
	before := good.changes.Load()
	updated := `{"v":1,"h":"` + rawName + `","u":"198.18.0.9","m":"02:00:00:00:00:09","b":{"default":["198.19.9.0/26","198.19.9.1/26","198.19.9.0/26"],"":[]}}`
	d.set(updated)
	if err := raw.UpdateNode(2 * time.Second); err != nil {
		t.Fatalf("UpdateNode: %v", err)
	}
	waitFor(t, "the old host's update to arrive", func() bool {
		for _, n := range good.ml.Members() {
			if n.Name == rawName {
				return string(n.Meta) == updated
			}
		}
		return false
	})
	waitFor(t, "OnChange after the old host's update", func() bool { return good.changes.Load() > before })
	if got := good.Members(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Errorf("after the old host's update: Members = %+v, want %+v", got, want)
	}
	if got, want := membership(good.Stats()), (Stats{Members: 1, RejectedMetas: uint64(len(bad))}); got != want {
		t.Errorf("after the old host's update: Stats = %+v, want %+v", got, want)
	}
}

// TestRejectedCountedOnce feeds the event handler directly: memberlist
// only reports metadata that changed, so a repeat cannot be provoked over
// the network.
func TestRejectedCountedOnce(t *testing.T) {
	mn := newMockNet(t)
	g := newMember(t, 0, mn.transport(string(hostName(0))))
	ev := events{g.Gossip}
	n := &memberlist.Node{Name: "x", Addr: net.IPv4(127, 0, 0, 9), Port: 1, Meta: []byte("bad")}
	ev.NotifyJoin(n)
	ev.NotifyUpdate(n)
	if got, want := membership(g.Stats()), (Stats{Rejected: 1, RejectedMetas: 1}); got != want {
		t.Errorf("after the same bad metadata twice: Stats = %+v, want %+v", got, want)
	}
	n.Meta = []byte("worse")
	ev.NotifyUpdate(n)
	ev.NotifyLeave(n)
	if got, want := membership(g.Stats()), (Stats{RejectedMetas: 2}); got != want {
		t.Errorf("after a second bad metadata and a leave: Stats = %+v, want %+v", got, want)
	}
	// Our own node is never a member.
	self := &memberlist.Node{Name: string(hostName(0)), Meta: []byte("bad")}
	ev.NotifyUpdate(self)
	if got, want := membership(g.Stats()), (Stats{RejectedMetas: 2}); got != want {
		t.Errorf("after an event about ourselves: Stats = %+v, want %+v", got, want)
	}
}

func TestShutdownMemberDisappears(t *testing.T) {
	ms := newCluster(t, 3)
	for _, m := range ms {
		waitFor(t, "the cluster to form", func() bool { return len(m.Members()) == 2 })
	}
	before := ms[0].changes.Load()

	// Stop host-2 the way overlayd does: cancel the ctx of Run.
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { errc <- ms[2].Run(ctx) }()
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v, want context.Canceled", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("Run did not return after its ctx was cancelled")
	}

	for i, m := range ms[:2] {
		waitFor(t, "host-2 to be dropped", func() bool {
			return reflect.DeepEqual(hosts(m.Members()), []overlay.HostID{hostName(1 - i)})
		})
	}
	if ms[0].changes.Load() == before {
		t.Error("OnChange was not called when a member failed")
	}
	for host, want := range map[overlay.HostID]State{hostName(1): Alive, hostName(2): Departed, "never-seen": Unknown} {
		if got := ms[0].State(host); got != want {
			t.Errorf("State(%s) = %v, want %v", host, got, want)
		}
	}
	if tr := ms[0].Stats().Traffic; tr.PacketsSent == 0 || tr.PacketsReceived == 0 || tr.BytesSent == 0 || tr.BytesReceived == 0 {
		t.Errorf("traffic of a member that probed and was probed: %+v", tr)
	}

	// Everything fails after shutdown; Shutdown itself is idempotent.
	if _, err := ms[2].Join(t.Context(), []string{ms[0].LocalAddr().String()}); !errors.Is(err, ErrClosed) {
		t.Errorf("Join after shutdown = %v, want ErrClosed", err)
	}
	if err := ms[2].Leave(t.Context()); !errors.Is(err, ErrClosed) {
		t.Errorf("Leave after shutdown = %v, want ErrClosed", err)
	}
	if err := ms[2].Shutdown(); err != nil {
		t.Errorf("second Shutdown: %v", err)
	}
	if err := ms[2].Run(t.Context()); err != nil {
		t.Errorf("Run after shutdown = %v, want nil", err)
	}
}

// TestLeaveLoopback runs two members on real UDP and TCP on 127.0.0.1.
// They use memberlist's default timing, under which failure detection
// takes at least 4s: a faster removal is the leave message's doing.
func TestLeaveLoopback(t *testing.T) {
	lan := func(c *Config) {
		d := DefaultConfig()
		c.ProbeInterval, c.ProbeTimeout = d.ProbeInterval, d.ProbeTimeout
		c.GossipInterval, c.PushPullInterval = d.GossipInterval, d.PushPullInterval
	}
	a, b := newMember(t, 0, nil, lan), newMember(t, 1, nil, lan)
	if ap := a.LocalAddr(); ap.Addr() != netip.MustParseAddr("127.0.0.1") || ap.Port() == 0 {
		t.Fatalf("LocalAddr = %v, want 127.0.0.1 and the port the kernel picked", ap)
	}
	if n, err := b.Join(t.Context(), []string{b.LocalAddr().String(), a.LocalAddr().String()}); n != 1 || err != nil {
		t.Fatalf("Join = %d, %v; want 1, nil", n, err)
	}
	waitFor(t, "a to see b", func() bool { return reflect.DeepEqual(a.Members(), []overlay.Member{expected(1)}) })
	waitFor(t, "b to see a", func() bool { return reflect.DeepEqual(b.Members(), []overlay.Member{expected(0)}) })
	// b's join was a TCP state exchange with a, which it opened.
	if tb, ta := b.Stats().Traffic, a.Stats().Traffic; tb.StreamsOpened == 0 || tb.StreamBytesSent == 0 || tb.StreamBytesReceived == 0 ||
		ta.StreamsAccepted == 0 || ta.StreamBytesReceived == 0 {
		t.Errorf("after b joined a over TCP: b's traffic %+v, a's %+v", tb, ta)
	}

	if err := b.Leave(t.Context()); err != nil {
		t.Fatalf("Leave: %v", err)
	}
	start := time.Now()
	waitFor(t, "a to drop b", func() bool { return len(a.Members()) == 0 })
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("a dropped b %v after Leave: as slow as failure detection", took)
	}
}

func TestJoinUnreachable(t *testing.T) {
	g := newMember(t, 0, nil)

	// A listener that accepts and never answers: memberlist would wait
	// for TCPTimeout.
	hole, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	t.Cleanup(func() {
		hole.Close()
		conns.Wait()
	})
	done := make(chan struct{})
	t.Cleanup(func() { close(done) })
	conns.Go(func() {
		for {
			c, err := hole.Accept()
			if err != nil {
				return
			}
			conns.Go(func() {
				defer c.Close()
				select {
				case <-done:
				case <-time.After(waitTimeout):
				}
			})
		}
	})

	// A closed port refuses connections.
	refused, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusedAddr := refused.Addr().String()
	refused.Close()

	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		n, err := g.Join(ctx, []string{hole.Addr().String()})
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("Join took %v after a 100ms deadline", took)
		}
		if n != 0 || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Join = %d, %v; want 0 and DeadlineExceeded", n, err)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		n, err := g.Join(ctx, []string{hole.Addr().String(), refusedAddr})
		if n != 0 || !errors.Is(err, context.Canceled) {
			t.Errorf("Join = %d, %v; want 0 and Canceled", n, err)
		}
	})
	t.Run("refused", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), waitTimeout)
		defer cancel()
		n, err := g.Join(ctx, []string{refusedAddr})
		if n != 0 || err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Join = %d, %v; want 0 and a connection error", n, err)
		}
	})
}

func TestNewValidates(t *testing.T) {
	for name, mod := range map[string]func(*Config){
		"no host":     func(c *Config) { c.Host = "" },
		"no underlay": func(c *Config) { c.Underlay = netip.Addr{} },
		"bad MAC":     func(c *Config) { c.VTEPMAC = c.VTEPMAC[:5] },
	} {
		cfg := DefaultConfig()
		cfg.Host, cfg.Underlay, cfg.VTEPMAC = hostName(0), underlay(0), mac(0)
		mod(&cfg)
		if g, err := New(cfg); err == nil {
			g.Shutdown()
			t.Errorf("%s: New succeeded, want an error", name)
		}
	}
}

// membership is s without its traffic, which no test can predict.
func membership(s Stats) Stats {
	s.Traffic = Traffic{}
	return s
}

// TestSuspect: a member that stops answering without leaving is suspected
// by the host whose probes got no ack (memberlist says so only in its
// log: this test fails if its wording changes), before it is declared
// failed; a direct ack ends a suspicion.
func TestSuspect(t *testing.T) {
	ms := newCluster(t, 3)
	for _, m := range ms {
		waitFor(t, "the cluster to form", func() bool { return len(m.Members()) == 2 })
	}
	if err := ms[2].Shutdown(); err != nil { // no leave message: a failure
		t.Fatal(err)
	}
	seen := map[int]bool{}
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		gone := 0
		for i, m := range ms[:2] {
			switch m.State(hostName(2)) {
			case Suspect:
				seen[i] = true
			case Departed:
				gone++
			}
		}
		if gone == 2 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if len(seen) == 0 {
		t.Fatalf("neither host suspected host-2 before it was declared failed\n%s\n%s", ms[0].log, ms[1].log)
	}
	for _, m := range ms[:2] {
		if st := m.State(hostName(2)); st != Departed {
			t.Errorf("State(host-2) after the suspicion = %v, want Departed", st)
		}
	}

	// A suspicion of a live member ends with its next direct ack.
	g := ms[0].Gossip
	g.suspected(string(hostName(1)))
	if st := g.State(hostName(1)); st != Suspect {
		t.Fatalf("State after a suspicion = %v, want Suspect", st)
	}
	pings{g}.NotifyPingComplete(&memberlist.Node{Name: string(hostName(1))}, time.Millisecond, nil)
	if st := g.State(hostName(1)); st != Alive {
		t.Fatalf("State after a direct ack = %v, want Alive", st)
	}
	// And a suspicion older than memberlist's longest is forgotten.
	g.suspected(string(hostName(1)))
	g.mu.Lock()
	g.suspects[string(hostName(1))] = time.Now().Add(-g.suspectFor)
	g.mu.Unlock()
	if st := g.State(hostName(1)); st != Alive {
		t.Fatalf("State after an old suspicion = %v, want Alive", st)
	}
}
