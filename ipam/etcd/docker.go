package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/overlay"
)

// The Docker driver's records. dockerd's networks are local to each
// dockerd (see package cnm), so each host keeps its own: which overlay
// network a Docker network ID stands for, and each Docker endpoint's
// address. dockerd never replays a network's creation after a restart of
// its own or of overlayd, so they are kept here, not in memory.

func (s *Store) dockerPrefix(h overlay.HostID) string { return s.prefix + "docker/" + string(h) + "/" }

// DockerEndpoint is what the Docker driver keeps of one endpoint.
type DockerEndpoint struct {
	// Network is the overlay network's name.
	Network string `json:"network"`
	// Addr is the endpoint's address with its block's prefix length.
	Addr netip.Prefix `json:"addr"`
	// Key is the attachment that holds the address.
	Key overlay.AttachmentKey `json:"key"`
	// MAC is the container interface's MAC address.
	MAC string `json:"mac"`
}

// PutDockerNetwork records that Docker network id on host h stands for
// overlay network name.
func (s *Store) PutDockerNetwork(ctx context.Context, h overlay.HostID, id, name string) error {
	return s.putJSON(ctx, s.dockerPrefix(h)+"networks/"+id, name)
}

// DockerNetwork returns the overlay network Docker network id on host h
// stands for, or an error wrapping overlay.ErrNotFound.
func (s *Store) DockerNetwork(ctx context.Context, h overlay.HostID, id string) (string, error) {
	var name string
	err := s.getJSON(ctx, s.dockerPrefix(h)+"networks/"+id, &name)
	return name, err
}

// DeleteDockerNetwork forgets Docker network id on host h.
func (s *Store) DeleteDockerNetwork(ctx context.Context, h overlay.HostID, id string) error {
	return s.delete(ctx, s.dockerPrefix(h)+"networks/"+id)
}

// PutDockerEndpoint records Docker endpoint id on host h.
func (s *Store) PutDockerEndpoint(ctx context.Context, h overlay.HostID, id string, ep DockerEndpoint) error {
	return s.putJSON(ctx, s.dockerPrefix(h)+"endpoints/"+id, ep)
}

// DockerEndpoint returns Docker endpoint id on host h, or an error
// wrapping overlay.ErrNotFound.
func (s *Store) DockerEndpoint(ctx context.Context, h overlay.HostID, id string) (DockerEndpoint, error) {
	var ep DockerEndpoint
	err := s.getJSON(ctx, s.dockerPrefix(h)+"endpoints/"+id, &ep)
	return ep, err
}

// DockerEndpoints returns host h's Docker endpoints by endpoint ID. A
// record that cannot be decoded is left out, and named in the error
// returned with the others.
func (s *Store) DockerEndpoints(ctx context.Context, h overlay.HostID) (map[string]DockerEndpoint, error) {
	ctx, cancel := bound(ctx)
	defer cancel()
	prefix := s.dockerPrefix(h) + "endpoints/"
	resp, err := s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", prefix, err)
	}
	out := make(map[string]DockerEndpoint, len(resp.Kvs))
	var errs []error
	for _, kv := range resp.Kvs {
		var ep DockerEndpoint
		if err := json.Unmarshal(kv.Value, &ep); err != nil {
			errs = append(errs, fmt.Errorf("%w: %s: %w", ErrBadRecord, kv.Key, err))
			continue
		}
		out[strings.TrimPrefix(string(kv.Key), prefix)] = ep
	}
	return out, errors.Join(errs...)
}

// DeleteDockerEndpoint forgets Docker endpoint id on host h.
func (s *Store) DeleteDockerEndpoint(ctx context.Context, h overlay.HostID, id string) error {
	return s.delete(ctx, s.dockerPrefix(h)+"endpoints/"+id)
}

func (s *Store) putJSON(ctx context.Context, key string, v any) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	val, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", key, err)
	}
	if _, err := s.cli.Put(ctx, key, string(val)); err != nil {
		return fmt.Errorf("write %s: %w", key, err)
	}
	return nil
}

func (s *Store) getJSON(ctx context.Context, key string, v any) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return fmt.Errorf("read %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return fmt.Errorf("%s: %w", key, overlay.ErrNotFound)
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, v); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrBadRecord, key, err)
	}
	return nil
}

func (s *Store) delete(ctx context.Context, key string) error {
	ctx, cancel := bound(ctx)
	defer cancel()
	if _, err := s.cli.Delete(ctx, key); err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	return nil
}
