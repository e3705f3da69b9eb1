package etcd_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// TestDockerRecords: the Docker driver's records are per host, read back
// as written, not found once deleted, and go with RemoveHost.
func TestDockerRecords(t *testing.T) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(t), "")
	if err := s.PutDockerNetwork(ctx, "a", "d0c1", "red"); err != nil {
		t.Fatal(err)
	}
	if name, err := s.DockerNetwork(ctx, "a", "d0c1"); err != nil || name != "red" {
		t.Fatalf("DockerNetwork = %q, %v", name, err)
	}
	if _, err := s.DockerNetwork(ctx, "b", "d0c1"); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("another host's record: %v", err)
	}
	ep := etcd.DockerEndpoint{Network: "red", Addr: netip.MustParsePrefix("10.30.0.5/26"), Key: overlay.AttachmentKey{ContainerID: "docker-ipam-1", IfName: "eth0"}, MAC: "02:00:00:00:00:05"}
	if err := s.PutDockerEndpoint(ctx, "a", "e1", ep); err != nil {
		t.Fatal(err)
	}
	if got, err := s.DockerEndpoint(ctx, "a", "e1"); err != nil || got != ep {
		t.Fatalf("DockerEndpoint = %+v, %v", got, err)
	}
	if err := s.PutDockerEndpoint(ctx, "b", "e2", ep); err != nil {
		t.Fatal(err)
	}
	if eps, err := s.DockerEndpoints(ctx, "a"); err != nil || len(eps) != 1 || eps["e1"] != ep {
		t.Fatalf("DockerEndpoints(a) = %+v, %v; want e1 alone", eps, err)
	}
	if err := s.DeleteDockerEndpoint(ctx, "a", "e1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DockerEndpoint(ctx, "a", "e1"); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("deleted endpoint: %v", err)
	}
	if _, err := s.RemoveHost(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.DockerNetwork(ctx, "a", "d0c1"); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("a removed host's Docker network: %v", err)
	}
}
