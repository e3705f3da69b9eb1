package attach

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/hostlink"
)

// fakeNetworks serves network "a" (its Attacher is a) and knows
// "booting", which is starting.
type fakeNetworks struct {
	a     Attacher
	kicks atomic.Int64
}

func (f *fakeNetworks) Lookup(name string) (Attacher, bool) {
	switch name {
	case "a":
		return f.a, true
	case "booting":
		return nil, true
	}
	return nil, false
}
func (f *fakeNetworks) Names() []string { return []string{"a", "booting"} }
func (f *fakeNetworks) Kick()           { f.kicks.Add(1) }

// TestService: requests go to their network; a network starting, or one
// etcd knows and this host does not serve yet, is Starting (and wakes the
// set); an unknown network is UnknownNetwork, naming those that exist;
// when etcd cannot say, Unavailable; Detach from an unknown network
// succeeds and deletes the host veth.
func TestService(t *testing.T) {
	ctx := context.Background()
	links := &fakeLinks{state: map[string]hostlink.State{}}
	h, _, _ := newHandler(t)
	nets := &fakeNetworks{a: h}
	svc := NewService(links)
	svc.Serve(nets, func(_ context.Context, name string) (bool, error) {
		if name == "broken" {
			return false, errors.New("etcd down")
		}
		return name == "fresh", nil
	})
	req := func(network string) Request {
		return Request{Network: network, Key: overlay.AttachmentKey{ContainerID: "c", IfName: "eth0"}}
	}
	if att, err := svc.Allocate(ctx, req("a")); err != nil || att.Network != "default" {
		t.Fatalf("Allocate on a = %+v, %v; want a's answer", att, err)
	}
	if err := svc.Flush(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Allocate(ctx, req("booting")); KindOf(err) != Starting || !strings.Contains(err.Error(), "network booting is starting") {
		t.Fatalf("a network starting: %v", err)
	}
	if _, err := svc.Allocate(ctx, req("fresh")); KindOf(err) != Starting || nets.kicks.Load() != 1 {
		t.Fatalf("a network etcd knows: %v, %d kicks", err, nets.kicks.Load())
	}
	_, err := svc.Check(ctx, req("nope"))
	if KindOf(err) != UnknownNetwork || !strings.Contains(err.Error(), "overlayctl network create nope") || !strings.Contains(err.Error(), "networks in etcd: a, booting") {
		t.Fatalf("an unknown network: %v", err)
	}
	if _, err := svc.Status(ctx, "broken"); KindOf(err) != Unavailable {
		t.Fatalf("etcd cannot say: %v", err)
	}
	name := overlay.HostVethName("nope", overlay.AttachmentKey{ContainerID: "c", IfName: "eth0"})
	links.set(name, hostlink.Attached)
	if err := svc.Detach(ctx, req("nope")); err != nil {
		t.Fatalf("Detach from an unknown network = %v, want success", err)
	}
	if st, _ := links.State(name); st != hostlink.Gone {
		t.Fatalf("Detach from an unknown network left its veth %v", st)
	}
}
