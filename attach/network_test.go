package attach

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/hostlink"
	"github.com/overlaynet/overlay/overlay/overlaytest"
)

const testMTU = 1450

var testNet = overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("198.19.0.0/28"), BlockBits: 29, VNI: 1, Port: 4789}

// fakeLinks is HostLinks in memory. Delete waits for release, when set.
type fakeLinks struct {
	mu      sync.Mutex
	state   map[string]hostlink.State
	deleted []string
	release chan struct{}
	mtu     map[string]int // MTU by name; testMTU when absent
}

func (f *fakeLinks) State(name string) (hostlink.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.state[name], nil
}

func (f *fakeLinks) MTU(name string) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.state[name] == hostlink.Gone {
		return 0, nil
	}
	if mtu, ok := f.mtu[name]; ok {
		return mtu, nil
	}
	return testMTU, nil
}

func (f *fakeLinks) Detach(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.state[name] != hostlink.Gone {
		f.state[name] = hostlink.Detached
	}
	return nil
}

func (f *fakeLinks) Delete(name string) error {
	if f.release != nil {
		<-f.release
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.state, name)
	f.deleted = append(f.deleted, name)
	return nil
}

func (f *fakeLinks) set(name string, s hostlink.State) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state[name] = s
}

func newHandler(t *testing.T) (*Network, *overlaytest.Store, *overlay.Status) {
	h, store, st, _ := newHandlerLinks(t)
	return h, store, st
}

func newHandlerLinks(t *testing.T) (*Network, *overlaytest.Store, *overlay.Status, *fakeLinks) {
	t.Helper()
	store := overlaytest.NewStore(testNet)
	pool := store.Pool("a")
	if _, err := pool.Lease(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := &overlay.Status{Passes: 1}
	links := &fakeLinks{state: map[string]hostlink.State{}}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	h := NewNetwork(ctx, testNet, testMTU, pool, func() overlay.Status { return *st }, func() int { return len(st.Config.Peers) }, links, slog.New(slog.NewTextHandler(io.Discard, nil)))
	return h, store, st, links
}

// released waits until the handler holds no address for key and its
// deletion is no longer pending.
func released(t *testing.T, h *Network, id string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	for {
		_, err := h.Check(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: id, IfName: "eth0"}})
		if KindOf(err) == NotFound {
			if err := h.waitPending(ctx, overlay.AttachmentKey{ContainerID: id, IfName: "eth0"}); err != nil {
				t.Fatalf("%s: deletion still pending: %v", id, err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still allocated: %v", id, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestNetwork(t *testing.T) {
	ctx := context.Background()
	h, store, st := newHandler(t)
	req := Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}}

	att, err := h.Allocate(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	want := Attachment{Network: "default", Addr: netip.MustParsePrefix("198.19.0.2/29"), Gateway: netip.MustParseAddr("198.19.0.1"), Subnet: testNet.CIDR,
		MTU: 1450, Bridge: "ovbr-default", New: true}
	if !reflect.DeepEqual(att, want) {
		t.Fatalf("Add = %+v\nwant %+v", att, want)
	}
	// A second ADD of the interface keeps its endpoint (none), whatever
	// it asks.
	again, _ := h.Allocate(ctx, Request{Network: "default", Key: req.Key, Endpoint: overlay.Endpoint{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 9}}})
	if again.Addr != att.Addr || again.New || again.MAC != nil {
		t.Fatalf("second Add = %+v; want the same address and no MAC, not new", again)
	}
	if got, err := h.Check(ctx, req); err != nil || got.Addr != att.Addr {
		t.Fatalf("Check = %+v, %v", got, err)
	}

	s, err := h.Status(ctx)
	if err != nil || !s.Ready || s.FreeAddresses != 4 {
		t.Fatalf("Status = %+v, %v; want ready with 4 free (8 - 3 reserved - 1 used)", s, err)
	}

	for i := range 4 {
		if _, err := h.Allocate(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "f" + string(rune('0'+i)), IfName: "eth0"}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.Allocate(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "full", IfName: "eth0"}}); KindOf(err) != NoAddress {
		t.Fatalf("exhausted: %v, want code %d", err, NoAddress)
	}
	if s, _ := h.Status(ctx); s.Ready || s.FreeAddresses != 0 {
		t.Fatalf("Status when full = %+v", s)
	}

	if err := h.Detach(ctx, req); err != nil {
		t.Fatal(err)
	}
	if err := h.Detach(ctx, req); err != nil {
		t.Fatalf("second Del: %v", err)
	}
	released(t, h, req.Key.ContainerID)

	store.SetErr(errors.New("etcdserver: request timed out"))
	if _, err := h.Allocate(ctx, req); KindOf(err) != Unavailable {
		t.Fatalf("store down: %v, want code 11", err)
	}
	store.SetErr(nil)
	store.SetFlushErr(errors.New("write allocations.db: no space left on device"))
	if err := h.Flush(ctx); KindOf(err) != Unavailable {
		t.Fatalf("Flush on a failing disk = %v, want code 11", err)
	}
	store.SetFlushErr(nil)
	if err := h.Flush(ctx); err != nil {
		t.Fatalf("Flush = %v", err)
	}

	st.Failures = st.Passes
	st.LastErr = errors.New("netlink: operation not permitted")
	if s, _ := h.Status(ctx); s.Ready || !strings.Contains(s.Reason, "never programmed") {
		t.Fatalf("Status before the dataplane = %+v", s)
	}
	st.Passes, st.Failures = 5, 1
	st.LastErr = errors.New("route add failed")
	if s, _ := h.Status(ctx); !s.Ready || !s.Degraded || !strings.Contains(s.Reason, "route add failed") {
		t.Fatalf("Status after a failed pass = %+v, want ready and degraded", s)
	}
	st.LastErr = nil
	st.Config.Peers = []overlay.Peer{{Host: "b"}}
	if s, _ := h.Status(ctx); !s.Ready || s.Degraded {
		t.Fatalf("Status with a live peer = %+v, want ready, not degraded", s)
	}
	h.alive = func() int { return 0 }
	if s, _ := h.Status(ctx); !s.Degraded || !strings.Contains(s.Reason, "answers gossip") {
		t.Fatalf("Status with no peer answering = %+v, want degraded", s)
	}
}

func TestNetworkGC(t *testing.T) {
	ctx := context.Background()
	h, _, _ := newHandler(t)
	for _, id := range []string{"keep", "stale1", "stale2", DockerKeyPrefix + "0a1b"} {
		if _, err := h.Allocate(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: id, IfName: "eth0"}}); err != nil {
			t.Fatal(err)
		}
	}
	out, err := h.GC(ctx, []overlay.AttachmentKey{{ContainerID: "keep", IfName: "eth0"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 {
		t.Fatalf("released %v, want stale1 and stale2", out)
	}
	if _, err := h.Check(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "keep", IfName: "eth0"}}); err != nil {
		t.Fatalf("GC released a valid attachment: %v", err)
	}
	// An empty list means nothing is valid, of the CNI runtime's: the
	// Docker front end's attachments are not its to collect.
	if out, err := h.GC(ctx, nil); err != nil || len(out) != 1 {
		t.Fatalf("GC with no valid attachments = %+v, %v", out, err)
	}
	if _, err := h.Check(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: DockerKeyPrefix + "0a1b", IfName: "eth0"}}); KindOf(err) == NotFound {
		t.Fatal("a CNI GC released a Docker attachment")
	}
}

func TestReleaseOrphans(t *testing.T) {
	ctx := context.Background()
	h, _, _, links := newHandlerLinks(t)
	live := overlay.AttachmentKey{ContainerID: "live", IfName: "eth0"}
	gone := overlay.AttachmentKey{ContainerID: "gone", IfName: "eth0"}
	pending := overlay.AttachmentKey{ContainerID: "pending", IfName: "eth0"}
	docker := overlay.AttachmentKey{ContainerID: DockerKeyPrefix + "0a1b", IfName: "eth0"} // between RequestAddress and Join
	for _, k := range []overlay.AttachmentKey{live, gone, pending, docker} {
		if _, err := h.Allocate(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: k.ContainerID, IfName: k.IfName}}); err != nil {
			t.Fatal(err)
		}
	}
	links.set(overlay.HostVethName("default", live), hostlink.Attached)
	links.set(overlay.HostVethName("default", pending), hostlink.Detached) // a DEL a stop cut short
	list, err := h.Allocations(ctx)
	if err != nil {
		t.Fatal(err)
	}
	released, err := h.ReleaseOrphans(ctx, list)
	if err != nil || len(released) != 2 {
		t.Fatalf("ReleaseOrphans = %v, %v; want gone and pending", released, err)
	}
	if _, err := h.Check(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "live", IfName: "eth0"}}); err != nil {
		t.Fatalf("live attachment released: %v", err)
	}
	if _, err := h.Check(ctx, Request{Network: "default", Key: docker}); err != nil {
		t.Fatalf("a Docker attachment without a veth released: %v", err)
	}
	if st, _ := links.State(overlay.HostVethName("default", pending)); st != hostlink.Gone {
		t.Fatal("the detached veth of a pending deletion was not deleted")
	}
}

// attached adds container id to h and marks its host veth attached, as
// the plugin leaves it after ADD; it returns the request, the veth's name
// and the attachment.
func attached(t *testing.T, h *Network, links *fakeLinks, id string) (Request, string, Attachment) {
	t.Helper()
	req := Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: id, IfName: "eth0"}}
	a, err := h.Allocate(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	name := overlay.HostVethName("default", overlay.AttachmentKey{ContainerID: id, IfName: "eth0"})
	links.set(name, hostlink.Attached)
	return req, name, a
}

// TestDelReleasesBeforeItAnswers: DEL answers once the veth is detached
// and the address released, so that the same static address can be given
// at once to a container recreated with it, while the kernel still
// deletes the old veth; an ADD of the same interface waits for that.
func TestDelReleasesBeforeItAnswers(t *testing.T) {
	ctx := context.Background()
	h, _, _, links := newHandlerLinks(t)
	req, name, a := attached(t, h, links, "c")
	links.release = make(chan struct{}) // the kernel is slow to delete
	if err := h.Detach(ctx, req); err != nil {
		t.Fatal(err)
	}
	if st, _ := links.State(name); st != hostlink.Detached {
		t.Fatalf("after DEL the veth is %v, want detached", st)
	}
	if _, err := h.Check(ctx, req); KindOf(err) != NotFound {
		t.Fatalf("CHECK after DEL = %v, want the address released", err)
	}
	// The container is recreated under a new ID with its static address.
	again := Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "c2", IfName: "eth0"}, IP: a.Addr.Addr()}
	if b, err := h.Allocate(ctx, again); err != nil || b.Addr != a.Addr {
		t.Fatalf("ADD of the static address right after DEL = %+v, %v; want %s", b, err, a.Addr)
	}
	added := make(chan Attachment, 1)
	go func() {
		a, _ := h.Allocate(ctx, req)
		added <- a
	}()
	select {
	case <-added:
		t.Fatal("ADD of the same interface did not wait for the pending deletion")
	case <-time.After(50 * time.Millisecond):
	}
	close(links.release)
	if a := <-added; !a.New {
		t.Fatalf("ADD after the deletion = %+v, want a new allocation", a)
	}
}

// TestCheckFailsForStaleMTU: a container created before the network's
// MTU changed fails CHECK with a message that says to recreate it.
func TestCheckFailsForStaleMTU(t *testing.T) {
	ctx := context.Background()
	h, _, _, links := newHandlerLinks(t)
	req, name, al := attached(t, h, links, "old")
	if _, err := h.Check(ctx, req); err != nil {
		t.Fatalf("CHECK at the network's MTU: %v", err)
	}
	links.mu.Lock()
	links.mtu = map[string]int{name: testMTU - 100}
	links.mu.Unlock()
	if _, err := h.Check(ctx, req); err == nil || !strings.Contains(err.Error(), "recreate the container") {
		t.Fatalf("CHECK with a stale MTU = %v, want a failure saying to recreate it", err)
	}
	stale := h.StaleMTU([]overlay.Allocation{{Key: overlay.AttachmentKey{ContainerID: "old", IfName: "eth0"}, Addr: al.Addr}})
	if len(stale) != 1 {
		t.Fatalf("StaleMTU = %v, want the old container", stale)
	}
}

// TestStartingAnswers: while overlayd starts, ADD, CHECK and GC get "try
// again later" at once, STATUS says it is not ready, and DEL deletes the
// host veth as the plugin does when overlayd is down.
func TestStartingAnswers(t *testing.T) {
	ctx := context.Background()
	links := &fakeLinks{state: map[string]hostlink.State{}}
	s := NewService(links)
	req := Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "c", IfName: "eth0"}}
	if _, err := s.Allocate(ctx, req); KindOf(err) != Starting || !strings.Contains(err.Error(), "overlayd is starting") {
		t.Errorf("ADD while starting = %v, want Starting", err)
	}
	if _, err := s.Check(ctx, req); KindOf(err) != Starting {
		t.Errorf("CHECK while starting = %v, want Starting", err)
	}
	if _, err := s.GC(ctx, "default", nil); KindOf(err) != Starting {
		t.Errorf("GC while starting = %v, want Starting", err)
	}
	if err := s.Flush(ctx, "default"); KindOf(err) != Starting {
		t.Errorf("Flush while starting = %v, want Starting", err)
	}
	if st, err := s.Status(ctx, "default"); err != nil || st.Ready || st.Reason == "" || st.Network != "default" {
		t.Errorf("STATUS while starting = %+v, %v; want not ready, with a reason", st, err)
	}
	name := overlay.HostVethName("default", overlay.AttachmentKey{ContainerID: "c", IfName: "eth0"})
	links.set(name, hostlink.Attached)
	if err := s.Detach(ctx, req); err != nil {
		t.Fatalf("DEL while starting: %v", err)
	}
	if st, _ := links.State(name); st != hostlink.Gone {
		t.Errorf("DEL while starting left the veth %v", st)
	}
}

// TestNetworkEndpoint: the MAC address asked for is the endpoint's, with
// its labels; a bad one is Invalid and allocates nothing.
func TestNetworkEndpoint(t *testing.T) {
	ctx := context.Background()
	h, store, _ := newHandler(t)
	mac := net.HardwareAddr{0x02, 0x42, 0, 0, 0, 7}
	key := overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}
	att, err := h.Allocate(ctx, Request{Network: "default", Key: key, Endpoint: overlay.Endpoint{MAC: mac, Labels: map[string]string{"app": "web"}}})
	if err != nil || att.MAC.String() != mac.String() || att.Labels["app"] != "web" {
		t.Fatalf("Add = %+v, %v; want MAC %s and label app=web", att, err, mac)
	}
	if al, err := store.Pool("a").Lookup(ctx, key); err != nil || al.Endpoint.MAC.String() != mac.String() {
		t.Fatalf("the pool holds %+v, %v; want MAC %s", al, err, mac)
	}
	// Asked again with another MAC: the endpoint it holds.
	if again, err := h.Allocate(ctx, Request{Network: "default", Key: key, Endpoint: overlay.Endpoint{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 9}}}); err != nil || again.MAC.String() != mac.String() {
		t.Fatalf("second Add = %+v, %v; want MAC %s", again, err, mac)
	}
	for _, ep := range []overlay.Endpoint{
		{MAC: net.HardwareAddr{0x01, 0, 0x5e, 0, 0, 1}},
		{Labels: map[string]string{"a b": "c"}},
	} {
		_, err := h.Allocate(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "bad", IfName: "eth0"}, Endpoint: ep})
		if KindOf(err) != Invalid {
			t.Errorf("Add with endpoint %+v = %v; want Invalid", ep, err)
		}
	}
	if _, err := store.Pool("a").Lookup(ctx, overlay.AttachmentKey{ContainerID: "bad", IfName: "eth0"}); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("a refused request allocated: %v", err)
	}
}

// TestRelease: an operator's release frees a leaked address (deleting a
// veth left over), refuses while the veth is attached unless forced, and
// names what is wrong for an address nobody here holds.
func TestRelease(t *testing.T) {
	ctx := context.Background()
	h, _, _, links := newHandlerLinks(t)
	_, leakVeth, leak := attached(t, h, links, "leaked")
	_, runVeth, run := attached(t, h, links, "running")
	links.set(leakVeth, hostlink.Detached) // its container is gone; a DEL never came

	key, deleted, err := h.Release(ctx, leak.Addr.Addr(), false)
	if err != nil || key.ContainerID != "leaked" || !deleted {
		t.Fatalf("Release(leaked) = %v, %v, %v", key, deleted, err)
	}
	released(t, h, "leaked")
	if st, _ := links.State(leakVeth); st != hostlink.Gone {
		t.Error("the leaked container's veth was not deleted")
	}

	_, _, err = h.Release(ctx, run.Addr.Addr(), false)
	if KindOf(err) != Invalid || !strings.Contains(err.Error(), "still attached") || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("Release(running) = %v; want a refusal that names --force", err)
	}
	if _, err := h.Check(ctx, Request{Network: "default", Key: overlay.AttachmentKey{ContainerID: "running", IfName: "eth0"}}); err != nil {
		t.Fatalf("a refused release changed something: %v", err)
	}
	if _, deleted, err := h.Release(ctx, run.Addr.Addr(), true); err != nil || !deleted {
		t.Fatalf("Release(running, force) = %v, %v", deleted, err)
	}
	released(t, h, "running")
	if st, _ := links.State(runVeth); st != hostlink.Gone {
		t.Error("a forced release left the veth")
	}

	if _, _, err := h.Release(ctx, leak.Addr.Addr(), false); KindOf(err) != NotFound || !strings.Contains(err.Error(), "overlayctl address holder") {
		t.Fatalf("Release of a free address = %v; want NotFound with a hint", err)
	}
}
