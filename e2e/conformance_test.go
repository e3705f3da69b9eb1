package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/conformance"
	"github.com/overlaynet/overlay/internal/simnet"
)

// hostTarget fills in what every target on simulated host h shares.
func hostTarget(n *simnet.Net, h *simnet.Host) conformance.Target {
	var seq atomic.Int64
	return conformance.Target{
		CNIPath: []string{filepath.Dir(bins.cni)},
		InHost:  h.InNS,
		NewNetNS: func(t *testing.T) string {
			c, err := n.NewContainer(context.Background(), h, fmt.Sprintf("cf%d", seq.Add(1)))
			if err != nil {
				t.Fatal(err)
			}
			return c.NetNSPath()
		},
		RemoveNetNS: func(path string) error {
			_, err := h.Exec(context.Background(), "ip", "netns", "delete", filepath.Base(path))
			return err
		},
	}
}

// TestConformance runs the conformance suite against overlay-cni on a
// simulated host.
func TestConformance(t *testing.T) {
	n := newNet(t, 1)
	h := n.Hosts[0]
	tg := hostTarget(n, h)
	tg.Plugin = bins.cni
	tg.Conf = func(v string) map[string]any {
		return map[string]any{"cniVersion": v, "name": "overlay", "type": "overlay-cni", "network": n.Network.Name, "socket": h.Socket}
	}
	tg.Allocated = func(id, ifName string) (bool, error) {
		_, err := cnirpc.NewClient(h.Socket).Check(context.Background(), cnirpc.Request{Network: n.Network.Name, ContainerID: id, IfName: ifName})
		var e *cnirpc.Error
		if errors.As(err, &e) && e.Code == cnirpc.CodeUnknownContainer {
			return false, nil
		}
		return err == nil, err
	}
	tg.StopDaemon = h.Stop
	tg.StartDaemon = func() error { return h.Start(context.Background()) }
	conformance.Run(t, tg)
}

// TestConformanceReference runs the same suite against the reference
// bridge + host-local plugins: it shows the suite is not written for one
// plugin, and records where the reference differs.
func TestConformanceReference(t *testing.T) {
	n := newNet(t, 1)
	h := n.Hosts[0]
	dataDir := filepath.Join(n.Dir, "host-local")
	tg := hostTarget(n, h)
	tg.Plugin = filepath.Join(filepath.Dir(bins.cni), "bridge")
	tg.Conf = func(v string) map[string]any {
		return map[string]any{"cniVersion": v, "name": "ref", "type": "bridge", "bridge": "refbr0", "isGateway": true,
			"ipam": map[string]any{"type": "host-local", "subnet": "198.18.100.0/24", "dataDir": dataDir}}
	}
	tg.Allocated = func(id, ifName string) (bool, error) {
		files, err := filepath.Glob(filepath.Join(dataDir, "ref", "*"))
		if err != nil {
			return false, err
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err == nil && strings.HasPrefix(string(b), id+"\n") {
				return true, nil
			}
		}
		return false, nil
	}
	tg.Skip = map[string]string{
		"GC_reads_both_attachment_keys": "host-local v1.9.1 reads only cni.dev/valid-attachments; given only cni.dev/attachments it releases every address",
	}
	conformance.Run(t, tg)
}
