package cnirpc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// ErrUnavailable is wrapped by client errors when overlayd cannot be
// reached: the socket is missing, refuses connections or times out.
var ErrUnavailable = errors.New("cnirpc: overlayd unavailable")

// maxResponseBytes bounds an answer read from overlayd.
const maxResponseBytes = 1 << 20

// Client talks to overlayd over its socket. It is safe for concurrent use.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client of the overlayd listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns:    1,
		IdleConnTimeout: 10 * time.Second,
	}
	return &Client{socket: socket, hc: &http.Client{Transport: tr}}
}

// Add asks for the address of r's container interface.
func (c *Client) Add(ctx context.Context, r Request) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, http.MethodPost, "add", r, &a)
	return a, err
}

// Check returns the attachment of r's container interface.
func (c *Client) Check(ctx context.Context, r Request) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, http.MethodPost, "check", r, &a)
	return a, err
}

// Del releases the address of r's container interface.
func (c *Client) Del(ctx context.Context, r Request) error {
	return c.do(ctx, http.MethodPost, "del", r, nil)
}

// GC releases the addresses of network on this host that no attachment
// in valid holds.
func (c *Client) GC(ctx context.Context, r GCRequest) (GCResponse, error) {
	var out GCResponse
	err := c.do(ctx, http.MethodPost, "gc", r, &out)
	return out, err
}

// Status returns the health of network on this host.
func (c *Client) Status(ctx context.Context, network string) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "status?network="+url.QueryEscape(network), nil, &st)
	return st, err
}

func (c *Client) do(ctx context.Context, method, op string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode %s request: %w", op, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://overlayd/"+Version+"/"+op, body)
	if err != nil {
		return fmt.Errorf("%s request: %w", op, err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("overlayd at %s: %w: %w", c.socket, ErrUnavailable, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
	if err != nil {
		return fmt.Errorf("read %s answer: %w: %w", op, ErrUnavailable, err)
	}
	if resp.StatusCode != http.StatusOK {
		e := &Error{}
		if json.Unmarshal(data, e) != nil || e.Code == 0 {
			return &Error{Code: CodeInternal, Msg: fmt.Sprintf("overlayd answered %s to %s", resp.Status, op), Details: string(bytes.TrimSpace(data))}
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return &Error{Code: CodeDecodingFailure, Msg: "decode overlayd's " + op + " answer", Details: err.Error()}
	}
	return nil
}
