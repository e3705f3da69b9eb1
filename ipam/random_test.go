package ipam_test

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/internal/etcdtest"
	"github.com/overlaynet/overlay/ipam"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/etcd/embedded"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/overlay"
)

var (
	randomSeed  = flag.Uint64("ipam.seed", 0, "seed of TestRandomized (0: a new one, printed)")
	randomSteps = flag.Int("ipam.steps", 400, "steps of TestRandomized")
)

// Timing of the randomized test, on its own clock (the give-back and
// reclaim periods) and on the real one (requests while etcd is down).
const (
	simStep        = time.Minute     // the simulated clock advances this much a step
	simIdleBlock   = 5 * time.Minute // IdleBlock of every host
	simReclaim     = 3 * time.Minute // reclaim period
	downTimeout    = 300 * time.Millisecond
	requestTimeout = 5 * time.Second
)

// simEtcd is an embedded etcd that the test stops and starts again.
type simEtcd struct {
	cfg embedded.Config
	e   *embedded.Server
	cli *clientv3.Client
}

func (s *simEtcd) up() bool { return s.e != nil }

func (s *simEtcd) start(t *testing.T) {
	t.Helper()
	e, err := embedded.Start(context.Background(), s.cfg)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	s.e = e
	// The client reconnects on its own; wait until it has.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := s.cli.Get(ctx, "ping")
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd started again but the client does not reach it: %v", err)
		}
	}
}

func (s *simEtcd) stop() {
	s.e.Close()
	s.e = nil
}

// simHost is one host: its overlayd's pool while it runs, and the model of
// what its runtime believes.
type simHost struct {
	id  overlay.HostID
	dir string

	// While it runs:
	db       *local.DB
	leaser   *etcd.Pool
	pool     *ipam.Pool
	stopLive context.CancelFunc
	lease    clientv3.LeaseID
	liveDone chan struct{}

	dead bool // killed for good, until it returns

	// containers are the attachments whose ADD was answered and that no
	// DEL removed: the runtime's view.
	containers map[overlay.AttachmentKey]netip.Prefix
	// forgotten are attachments the runtime lost without a DEL: GC must
	// release them.
	forgotten map[overlay.AttachmentKey]bool
	// pending is the key of an ADD that was not answered (overlayd
	// crashed first): the runtime runs DEL for it once overlayd is back.
	pending []overlay.AttachmentKey
}

func (h *simHost) running() bool { return h.pool != nil }

// sim is the randomized test's world.
type sim struct {
	t     *testing.T
	rng   *rand.Rand
	etcd  *simEtcd
	store *etcd.Store
	net   overlay.Network
	hosts []*simHost
	now   time.Time // the simulated clock
	next  int       // the next container ID

	stats map[string]int
}

func (s *sim) ctx() (context.Context, context.CancelFunc) {
	if s.etcd.up() {
		return context.WithTimeout(context.Background(), requestTimeout)
	}
	return context.WithTimeout(context.Background(), downTimeout)
}

// start starts h's overlayd the way the daemon does: open its record,
// read its blocks, report stranded allocations, claim a first block,
// create its liveness key. etcd is up.
func (s *sim) start(h *simHost) {
	t := s.t
	db, err := local.Open(filepath.Join(h.dir, "alloc.db"), h.id)
	if err != nil {
		t.Fatalf("%s: open record: %v", h.id, err)
	}
	h.db = db
	h.leaser = s.store.Pool(s.net, h.id)
	ctx, cancel := s.ctx()
	defer cancel()
	if _, err := h.leaser.Load(ctx); err != nil {
		t.Fatalf("%s: load blocks: %v", h.id, err)
	}
	h.pool, err = ipam.New(ipam.Config{Network: s.net, Host: h.id, MaxBlocks: 4, IdleBlock: simIdleBlock}, h.leaser,
		func(usable func() []netip.Prefix) (ipam.Book, error) {
			a, _, err := db.Allocator(s.net, h.id, usable)
			return a, err
		})
	if err != nil {
		t.Fatalf("%s: pool: %v", h.id, err)
	}
	// Containers whose addresses are in blocks the host lost: CHECK
	// fails for them and the runtime recreates them (DEL, then ADD).
	for _, al := range h.pool.ReportStranded(nil) {
		addr, ok := h.containers[al.Key]
		if !ok && !h.forgotten[al.Key] {
			t.Fatalf("%s: stranded allocation %s=%s that no container holds", h.id, al.Key, al.Addr)
		}
		if ok && addr != al.Addr {
			t.Fatalf("%s: stranded allocation %s=%s, the container holds %s", h.id, al.Key, al.Addr, addr)
		}
		if _, err := h.pool.Lookup(ctx, al.Key); !errors.Is(err, overlay.ErrConflict) {
			t.Fatalf("%s: lookup of stranded %s: %v, want a conflict (CHECK fails)", h.id, al.Key, err)
		}
		s.release(h, al.Key)
		delete(h.containers, al.Key)
		delete(h.forgotten, al.Key)
		s.stats["stranded recreated"]++
	}
	if err := h.pool.Ensure(ctx); err != nil && !errors.Is(err, overlay.ErrPoolExhausted) {
		t.Fatalf("%s: first block: %v", h.id, err)
	}
	live := s.store.Liveness(h.id, 0, nil)
	if h.lease, err = live.Create(ctx); err != nil {
		t.Fatalf("%s: liveness: %v", h.id, err)
	}
	lctx, stop := context.WithCancel(context.Background())
	h.stopLive, h.liveDone = stop, make(chan struct{})
	go func() { defer close(h.liveDone); live.Run(lctx, h.lease) }()
	// DEL for the ADDs that were never answered.
	for _, k := range h.pending {
		s.release(h, k)
	}
	h.pending = nil
	h.dead = false
}

// crash abandons h's overlayd without a flush: decisions not on disk are
// lost, as with kill -9. Its liveness lease stays until it expires.
func (s *sim) crash(h *simHost) {
	s.countStats(h)
	h.stopLive()
	<-h.liveDone
	h.db.Close()
	h.db, h.leaser, h.pool = nil, nil, nil
}

// release is the runtime's DEL of k on h: release, then flush before the
// answer.
func (s *sim) release(h *simHost, k overlay.AttachmentKey) {
	ctx, cancel := s.ctx()
	defer cancel()
	if err := h.pool.Release(ctx, k); err != nil {
		s.t.Fatalf("%s: release %s: %v", h.id, k, err)
	}
	if err := h.pool.Flush(ctx); err != nil {
		s.t.Fatalf("%s: flush after releasing %s: %v", h.id, k, err)
	}
}

func (s *sim) newKey() overlay.AttachmentKey {
	s.next++
	return overlay.AttachmentKey{ContainerID: fmt.Sprintf("c%05d", s.next), IfName: "eth0"}
}

func (s *sim) pick(pred func(*simHost) bool) *simHost {
	var hs []*simHost
	for _, h := range s.hosts {
		if pred(h) {
			hs = append(hs, h)
		}
	}
	if len(hs) == 0 {
		return nil
	}
	return hs[s.rng.IntN(len(hs))]
}

func (s *sim) count(pred func(*simHost) bool) int {
	n := 0
	for _, h := range s.hosts {
		if pred(h) {
			n++
		}
	}
	return n
}

func pickKey[V any](rng *rand.Rand, m map[overlay.AttachmentKey]V) (overlay.AttachmentKey, bool) {
	if len(m) == 0 {
		return overlay.AttachmentKey{}, false
	}
	keys := slices.SortedFunc(maps.Keys(m), compareKeys)
	return keys[rng.IntN(len(keys))], true
}

func compareKeys(a, b overlay.AttachmentKey) int {
	return cmp.Or(cmp.Compare(a.ContainerID, b.ContainerID), cmp.Compare(a.IfName, b.IfName))
}

// byKey returns list's addresses by key.
func byKey(list []overlay.Allocation) map[overlay.AttachmentKey]netip.Prefix {
	out := make(map[overlay.AttachmentKey]netip.Prefix, len(list))
	for _, al := range list {
		out[al.Key] = al.Addr
	}
	return out
}

// countStats adds what h's pool did since it started to s.stats.
func (s *sim) countStats(h *simHost) {
	st := h.pool.Stats()
	s.stats["blocks claimed"] += int(st.Claims)
	s.stats["blocks given back"] += int(st.GiveBacks)
	s.stats["ADDs that waited for a claim"] += int(st.WaitedClaims)
}

// add is the runtime's ADD on h: allocate, flush, answer.
func (s *sim) add(h *simHost) {
	k := s.newKey()
	ctx, cancel := s.ctx()
	defer cancel()
	al, err := h.pool.Allocate(ctx, k, overlay.Endpoint{})
	if err == nil {
		err = h.pool.Flush(ctx)
	}
	if err != nil {
		// A full pool, or a claim that etcd being down failed: the
		// runtime runs DEL after a failed ADD.
		if !errors.Is(err, overlay.ErrPoolExhausted) && s.etcd.up() {
			s.t.Fatalf("%s: ADD %s with etcd up: %v", h.id, k, err)
		}
		s.stats["add failed"]++
		s.release(h, k)
		return
	}
	s.stats["add"]++
	h.containers[k] = al.Addr
}

// addStatic is an ADD with a static address: a random container address
// of the network, which may be free, in one of h's blocks, or in another
// host's block.
func (s *sim) addStatic(h *simHost) {
	b := s.net.Block(s.rng.IntN(s.net.NumBlocks()))
	a := b.Addr()
	for range 2 + s.rng.IntN(s.net.BlockCapacity()) {
		a = a.Next()
	}
	k := s.newKey()
	ctx, cancel := s.ctx()
	defer cancel()
	al, err := h.pool.AllocateAddr(ctx, k, a, overlay.Endpoint{})
	if err == nil {
		err = h.pool.Flush(ctx)
	}
	if err != nil {
		s.stats["static refused"]++
		s.release(h, k)
		return
	}
	if al.Addr.Addr() != a || !slices.Contains(h.pool.Held(), al.Addr.Masked()) {
		s.t.Fatalf("%s: static %s got %s (held %v)", h.id, a, al.Addr, h.pool.Held())
	}
	s.stats["static"]++
	h.containers[k] = al.Addr
}

// gc is the runtime's GC on h: every container it knows is valid.
func (s *sim) gc(h *simHost) {
	ctx, cancel := s.ctx()
	defer cancel()
	list, err := h.pool.List(ctx)
	if err != nil {
		s.t.Fatalf("%s: list: %v", h.id, err)
	}
	for _, al := range list {
		if _, ok := h.containers[al.Key]; !ok {
			if !h.forgotten[al.Key] {
				s.t.Fatalf("%s: GC found %s=%s, which no container held: leaked", h.id, al.Key, al.Addr)
			}
			if err := h.pool.Release(ctx, al.Key); err != nil {
				s.t.Fatalf("%s: GC release %s: %v", h.id, al.Key, err)
			}
			s.stats["gc released"]++
		}
	}
	if err := h.pool.Flush(ctx); err != nil {
		s.t.Fatalf("%s: GC flush: %v", h.id, err)
	}
	clear(h.forgotten)
}

// mirror copies h's record to etcd, as the daemon's mirror loop does.
func (s *sim) mirror(h *simHost) error {
	ctx, cancel := s.ctx()
	defer cancel()
	list, err := h.pool.List(ctx)
	if err != nil {
		return err
	}
	_, err = h.leaser.Mirror(ctx, list)
	return err
}

// check checks what must hold after every step: the running hosts'
// records hold what their runtimes believe (stranded ones aside until
// the host restarts), and no address is held twice among them.
func (s *sim) check(step int) {
	t := s.t
	holder := make(map[netip.Addr]overlay.AttachmentKey)
	for _, h := range s.hosts {
		if !h.running() {
			continue
		}
		ctx, cancel := s.ctx()
		for k, addr := range h.containers {
			al, err := h.pool.Lookup(ctx, k)
			if err != nil || al.Addr != addr {
				t.Fatalf("step %d: %s: container %s holds %s, the record says %+v, %v", step, h.id, k, addr, al, err)
			}
			if other, dup := holder[addr.Addr()]; dup {
				t.Fatalf("step %d: address %s held by both %s and %s", step, addr, other, k)
			}
			holder[addr.Addr()] = k
		}
		cancel()
		if n := len(h.pool.Held()); n > 4 {
			t.Fatalf("step %d: %s holds %d blocks, over its cap of 4", step, h.id, n)
		}
	}
}

// TestRandomized interleaves, on four hosts against one embedded etcd,
// ADDs (dynamic and static), DELs, containers the runtime forgets, GC,
// background block growth and give-back, mirror passes, overlayd crashes
// (with an ADD in flight, not flushed), etcd restarts (with ADDs and DELs
// while it is down), host deaths, reclaims and returns, all from one
// seed. After every step no address is held twice and every host's
// record holds what its runtime believes; at the end, with every host
// back and etcd up, no address is leaked, etcd's copy equals every
// host's record, and every block has one owner, the host that believes
// it holds it. Rerun a failure with -ipam.seed.
func TestRandomized(t *testing.T) {
	if testing.Short() {
		t.Skip("hundreds of steps against a real etcd: skipped with -short")
	}
	seed := *randomSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d: rerun with go test ./ipam -run TestRandomized -ipam.seed=%d", seed, seed)

	se := &simEtcd{cfg: etcdtest.Config(t)}
	dir := se.cfg.Dir // the hosts' files beside etcd's
	var err error
	if se.e, err = embedded.Start(context.Background(), se.cfg); err != nil {
		t.Fatal(err)
	}
	if se.cli, err = etcd.Connect(context.Background(), etcd.ClientConfig{Endpoints: []string{se.cfg.ClientURL}}); err != nil {
		t.Fatal(err)
	}
	s := &sim{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), etcd: se, store: etcd.NewStore(se.cli, ""),
		// 8 blocks of 13 addresses for 4 hosts with a cap of 4 each: the
		// network fills, hosts wait for claims, blocks change hands.
		net: overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("10.77.0.0/25"), BlockBits: 28, VNI: 1, Port: 4789},
		now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), stats: make(map[string]int)}
	t.Cleanup(func() {
		for _, h := range s.hosts {
			if h.running() {
				s.crash(h)
			}
		}
		se.cli.Close()
		if se.up() {
			se.stop()
		}
	})
	if _, err := s.store.EnsureNetwork(context.Background(), s.net); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		h := &simHost{id: overlay.HostID(fmt.Sprintf("h%d", i)), dir: filepath.Join(dir, fmt.Sprint("h", i)),
			containers: make(map[overlay.AttachmentKey]netip.Prefix), forgotten: make(map[overlay.AttachmentKey]bool)}
		if err := os.MkdirAll(h.dir, 0o700); err != nil {
			t.Fatal(err)
		}
		s.hosts = append(s.hosts, h)
		s.start(h)
	}

	running := func(h *simHost) bool { return h.running() }
	withContainers := func(h *simHost) bool { return h.running() && len(h.containers) > 0 }
	restartAt := -1 // the step at which etcd, stopped, starts again
	for step := range *randomSteps {
		s.now = s.now.Add(simStep)
		if step == restartAt {
			se.start(t)
		}
		up := se.up()
		switch r := s.rng.IntN(100); {
		case r < 36:
			if h := s.pick(running); h != nil {
				s.add(h)
			}
		case r < 40:
			if h := s.pick(running); h != nil {
				s.addStatic(h)
			}
		case r < 56:
			if h := s.pick(withContainers); h != nil {
				k, _ := pickKey(s.rng, h.containers)
				s.release(h, k)
				delete(h.containers, k)
				s.stats["del"]++
			}
		case r < 59:
			if h := s.pick(withContainers); h != nil {
				k, _ := pickKey(s.rng, h.containers)
				delete(h.containers, k)
				h.forgotten[k] = true
				s.stats["forgotten"]++
			}
		case r < 63:
			if h := s.pick(running); h != nil {
				s.gc(h)
				s.stats["gc"]++
			}
		case r < 69:
			if h := s.pick(running); h != nil {
				ctx, cancel := s.ctx()
				err := h.pool.Grow(ctx)
				cancel()
				if err != nil && up {
					t.Fatalf("step %d: %s: grow with etcd up: %v", step, h.id, err)
				}
				s.stats["grow"]++
			}
		case r < 74:
			// A give-back pass now, and another once IdleBlock has
			// passed: the blocks empty in both are given back.
			if h := s.pick(running); h != nil {
				ctx, cancel := s.ctx()
				h.pool.GiveBackIdle(ctx, s.now)
				s.now = s.now.Add(simIdleBlock)
				h.pool.GiveBackIdle(ctx, s.now)
				cancel()
				s.stats["give-back passes"]++
			}
		case r < 80:
			if h := s.pick(running); h != nil {
				if err := s.mirror(h); err != nil && up {
					t.Fatalf("step %d: %s: mirror with etcd up: %v", step, h.id, err)
				}
				s.stats["mirror"]++
			}
		case r < 83:
			if h := s.pick(running); h != nil && up {
				ctx, cancel := s.ctx()
				lost, err := h.leaser.Verify(ctx)
				cancel()
				if err != nil || len(lost) > 0 {
					t.Fatalf("step %d: %s: a running host lost blocks %v: %v", step, h.id, lost, err)
				}
			}
		case r < 87:
			// A crash, maybe with an ADD decided but not yet flushed,
			// then a restart once etcd is up.
			if h := s.pick(running); h != nil {
				if s.rng.IntN(2) == 0 {
					k := s.newKey()
					ctx, cancel := s.ctx()
					if _, err := h.pool.Allocate(ctx, k, overlay.Endpoint{}); err == nil {
						h.pending = append(h.pending, k)
					}
					cancel()
				}
				s.crash(h)
				s.stats["crash"]++
				if up {
					s.start(h)
				}
			}
		case r < 88:
			// etcd stops, to start again a few steps later. Rare:
			// stopping an embedded etcd with clients connected takes its
			// request timeout (7 s), for it waits for their connections
			// to close.
			if up {
				se.stop()
				restartAt = step + 3 + s.rng.IntN(15)
				s.stats["etcd restarts"]++
			}
		case r < 91:
			// A death: the host's liveness key goes with its lease.
			if h := s.pick(running); h != nil && up && s.count(running) >= 3 {
				lease := h.lease
				s.crash(h)
				ctx, cancel := s.ctx()
				if _, err := se.cli.Revoke(ctx, lease); err != nil {
					t.Fatalf("step %d: revoke %s's lease: %v", step, h.id, err)
				}
				cancel()
				h.dead = true
				s.stats["death"]++
			}
		case r < 98:
			if h := s.pick(running); h != nil && up {
				ctx, cancel := s.ctx()
				rec, err := s.store.Reclaim(ctx, s.net, h.id, simReclaim, s.now)
				cancel()
				if err != nil {
					t.Fatalf("step %d: reclaim: %v", step, err)
				}
				for _, r := range rec {
					if o := s.hosts[slices.IndexFunc(s.hosts, func(x *simHost) bool { return x.id == r.Owner })]; !o.dead {
						t.Fatalf("step %d: %s reclaimed %s from %s, which is not dead", step, h.id, r.Block, r.Owner)
					}
				}
				s.stats["reclaimed blocks"] += len(rec)
			}
		default:
			if h := s.pick(func(h *simHost) bool { return h.dead }); h != nil && up {
				s.start(h)
				s.stats["return"]++
			}
		}
		// A host that crashed while etcd was down starts once it is up.
		if se.up() {
			for _, h := range s.hosts {
				if !h.running() && !h.dead {
					s.start(h)
				}
			}
		}
		s.check(step)
	}

	// The end: etcd up, every host back, a GC, a give-back pass and a
	// mirror pass each.
	if !se.up() {
		se.start(t)
	}
	for _, h := range s.hosts {
		if !h.running() {
			s.start(h)
		}
	}
	for _, h := range s.hosts {
		s.gc(h)
		// Give-backs that etcd being down left unfinished end now.
		ctx, cancel := s.ctx()
		h.pool.GiveBackIdle(ctx, s.now)
		cancel()
		if err := s.mirror(h); err != nil {
			t.Fatalf("%s: final mirror: %v", h.id, err)
		}
	}
	s.check(*randomSteps)
	ctx := context.Background()
	owners, err := s.store.Pool(s.net, "checker").Owners(ctx)
	if err != nil {
		t.Fatal(err)
	}
	believed := make(map[netip.Prefix]overlay.HostID)
	for _, h := range s.hosts {
		list, err := h.pool.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		mine := byKey(list)
		if !maps.Equal(mine, h.containers) {
			t.Errorf("%s: record %v, runtime's containers %v: leaked or lost addresses", h.id, mine, h.containers)
		}
		copyList, err := h.leaser.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		copied := byKey(copyList)
		if !maps.Equal(copied, mine) {
			t.Errorf("%s: etcd's copy %v differs from the host's record %v", h.id, copied, mine)
		}
		for _, b := range h.pool.Held() {
			if o, dup := believed[b]; dup {
				t.Errorf("block %s believed held by %s and %s", b, o, h.id)
			}
			believed[b] = h.id
		}
		for _, al := range list {
			if believed[al.Addr.Masked()] != h.id {
				t.Errorf("%s: %s=%s is outside the blocks it holds", h.id, al.Key, al.Addr)
			}
		}
	}
	for _, h := range s.hosts {
		s.countStats(h)
	}
	if !maps.Equal(owners, believed) {
		t.Errorf("etcd's block owners %v differ from what the hosts believe they hold %v", owners, believed)
	}
	t.Logf("steps %d: %v", *randomSteps, s.stats)
}
