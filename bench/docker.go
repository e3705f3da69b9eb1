package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/overlaynet/overlay/internal/simnet"
)

// dockerFigures times `docker run -d` to a running container on host h
// with this project's driver, with --network none and with Docker's own
// bridge driver, interleaved sample by sample, and the driver's calls that
// a container's start makes, sent to overlayd's plugin socket alone.
func dockerFigures(ctx context.Context, net *simnet.Net, h *simnet.Host, samples int) error {
	root := os.Getenv(simnet.DockerRootEnv)
	if root == "" {
		fmt.Printf("docker run: skipped, %s is not set (scripts/lib.sh ensure_docker unpacks Debian's docker.io)\n\n", simnet.DockerRootEnv)
		return nil
	}
	dir, err := os.MkdirTemp("", "ovbench-docker-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	d, err := simnet.StartDockerd(ctx, h, root, dir)
	defer d.Stop()
	if err != nil {
		return err
	}
	if err := d.ImportBusybox(ctx); err != nil {
		return err
	}
	const subnet = "10.30.0.0/16"
	if _, err := d.Docker(ctx, "network", "create", "-d", "overlaynet", "--ipam-driver", "overlaynet", "--subnet", subnet, "--opt", "name=dbench", "ov"); err != nil {
		return err
	}
	if err := h.WaitNetwork(ctx, "dbench"); err != nil {
		return err
	}
	// Docker's bridge driver, in the host's namespace like the rest of
	// this dockerd; --iptables=false, so no rule is written.
	if _, err := d.Docker(ctx, "network", "create", "-d", "bridge", "--subnet", "172.30.0.0/16", "br"); err != nil {
		return err
	}
	kinds := []string{"none", "br", "ov"}
	times := map[string][]time.Duration{}
	for i := -1; i < samples; i++ { // the first round warms up
		for j := range kinds {
			kind := kinds[(i+1+j)%len(kinds)] // each goes first in turn
			name := fmt.Sprintf("%s%d", kind, i+1)
			t := time.Now()
			if _, err := d.Docker(ctx, "run", "-d", "--pull", "never", "--name", name, "--network", kind, "bb:1", "sleep", "1000"); err != nil {
				return err
			}
			if i >= 0 {
				times[kind] = append(times[kind], time.Since(t))
			}
			if _, err := d.Docker(ctx, "rm", "-f", name); err != nil {
				return err
			}
		}
	}
	calls, err := driverCalls(ctx, h, subnet, samples)
	if err != nil {
		return err
	}
	// The figures after these want the hosts as they were.
	if _, err := d.Docker(ctx, "network", "rm", "ov", "br"); err != nil {
		return err
	}
	if out, err := net.Ctl(ctx, "network", "delete", "dbench"); err != nil {
		return fmt.Errorf("overlayctl network delete dbench: %w: %s", err, out)
	}
	fmt.Println("docker run -d to a running container, one host (dockerd 20.10, containers removed between samples)")
	report("--network with this driver", times["ov"], times["none"], "--network none")
	report("--network with Docker's bridge", times["br"], times["none"], "--network none")
	fmt.Printf("  %-34s %.2f\n", "this driver / bridge (medians):", float64(median(times["ov"]))/float64(median(times["br"])))
	report("the driver's calls of one start", calls, nil, "")
	fmt.Printf("  %-34s %.0f%%\n", "their share of docker run:", 100*float64(median(calls))/float64(median(times["ov"])))
	fmt.Println()
	return nil
}

// driverCalls times, samples times, the calls dockerd makes of the
// driver to start a container (RequestAddress, CreateEndpoint, Join,
// ProgramExternalConnectivity, EndpointOperInfo), sent to h's plugin
// socket directly; the calls that remove it follow, untimed.
func driverCalls(ctx context.Context, h *simnet.Host, subnet string, samples int) ([]time.Duration, error) {
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", h.DockerSocket())
	}}, Timeout: 10 * time.Second}
	call := func(method string, req, resp any) error {
		body, err := json.Marshal(req)
		if err != nil {
			return err
		}
		r, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://plugin/"+method, bytes.NewReader(body))
		if err != nil {
			return err
		}
		res, err := c.Do(r)
		if err != nil {
			return fmt.Errorf("%s: %w", method, err)
		}
		defer res.Body.Close()
		var out map[string]any
		if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
			return fmt.Errorf("%s: %w", method, err)
		}
		if res.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s: %v", method, res.Status, out["Err"])
		}
		if resp != nil {
			b, _ := json.Marshal(out)
			return json.Unmarshal(b, resp)
		}
		return nil
	}
	const netID = "bench0000000000000000000000000000000000000000000000000000000000"
	if err := call("NetworkDriver.CreateNetwork", map[string]any{"NetworkID": netID, "IPv4Data": []map[string]any{{"Pool": subnet}}}, nil); err != nil {
		return nil, err
	}
	var out []time.Duration
	for i := range samples {
		ep := fmt.Sprintf("bench%059d", i)
		t := time.Now()
		var addr struct{ Address string }
		if err := call("IpamDriver.RequestAddress", map[string]any{"PoolID": subnet}, &addr); err != nil {
			return nil, err
		}
		if err := call("NetworkDriver.CreateEndpoint", map[string]any{"NetworkID": netID, "EndpointID": ep, "Interface": map[string]any{"Address": addr.Address}}, nil); err != nil {
			return nil, err
		}
		if err := call("NetworkDriver.Join", map[string]any{"NetworkID": netID, "EndpointID": ep, "SandboxKey": "/var/run/docker/netns/bench"}, nil); err != nil {
			return nil, err
		}
		if err := call("NetworkDriver.ProgramExternalConnectivity", map[string]any{"NetworkID": netID, "EndpointID": ep}, nil); err != nil {
			return nil, err
		}
		if err := call("NetworkDriver.EndpointOperInfo", map[string]any{"NetworkID": netID, "EndpointID": ep}, nil); err != nil {
			return nil, err
		}
		out = append(out, time.Since(t))
		for _, m := range []string{"NetworkDriver.RevokeExternalConnectivity", "NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint"} {
			if err := call(m, map[string]any{"NetworkID": netID, "EndpointID": ep}, nil); err != nil {
				return nil, err
			}
		}
		a, _, _ := bytes.Cut([]byte(addr.Address), []byte("/"))
		if err := call("IpamDriver.ReleaseAddress", map[string]any{"PoolID": subnet, "Address": string(a)}, nil); err != nil {
			return nil, err
		}
	}
	return out, call("NetworkDriver.DeleteNetwork", map[string]any{"NetworkID": netID}, nil)
}
