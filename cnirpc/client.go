package cnirpc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"time"
)

// Errors the client wraps when overlayd does not answer.
var (
	// ErrUnavailable means overlayd could not be reached at all: the
	// socket is missing or refuses connections. The request was not
	// sent.
	ErrUnavailable = errors.New("cnirpc: overlayd unavailable")
	// ErrNoAnswer means the request was sent but no whole answer came
	// back (a timeout, a connection closed early): overlayd may or may
	// not have acted on it.
	ErrNoAnswer = errors.New("cnirpc: no answer from overlayd")
	// errAnswerTooLarge means the answer exceeded maxResponseBytes.
	errAnswerTooLarge = errors.New("answer too large")
)

// maxResponseBytes bounds an answer read from overlayd.
const maxResponseBytes = 1 << 20

// Client talks to overlayd over its socket. It is safe for concurrent
// use. Each call is one HTTP/1.0 exchange on a connection of its own,
// written and read by hand: a CNI plugin makes one call per exec, and
// both an http.Transport and linking net/http into the plugin cost more
// than the exchange itself. HTTP/1.0 makes the server end the body by
// closing the connection, so there is no chunked encoding to read.
type Client struct {
	socket string
}

// NewClient returns a client of the overlayd listening on socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket}
}

// Add asks for the address of r's container interface.
func (c *Client) Add(ctx context.Context, r Request) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, "POST", "add", r, &a)
	return a, err
}

// Check returns the attachment of r's container interface.
func (c *Client) Check(ctx context.Context, r Request) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, "POST", "check", r, &a)
	return a, err
}

// Del releases the address of r's container interface.
func (c *Client) Del(ctx context.Context, r Request) error {
	return c.do(ctx, "POST", "del", r, nil)
}

// GC releases the addresses of network on this host that no attachment
// in valid holds.
func (c *Client) GC(ctx context.Context, r GCRequest) (GCResponse, error) {
	var out GCResponse
	err := c.do(ctx, "POST", "gc", r, &out)
	return out, err
}

// Status returns the health of network on this host.
func (c *Client) Status(ctx context.Context, network string) (Status, error) {
	var st Status
	err := c.do(ctx, "GET", "status?network="+url.QueryEscape(network), nil, &st)
	return st, err
}

func (c *Client) do(ctx context.Context, method, op string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("encode %s request: %w", op, err)
		}
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		return fmt.Errorf("overlayd at %s: %w: %w", c.socket, ErrUnavailable, err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	var reqBuf bytes.Buffer
	fmt.Fprintf(&reqBuf, "%s /%s/%s HTTP/1.0\r\nHost: overlayd\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
		method, Version, op, len(body))
	reqBuf.Write(body)
	if _, err := conn.Write(reqBuf.Bytes()); err != nil {
		return fmt.Errorf("send %s to overlayd at %s: %w: %w", op, c.socket, ErrNoAnswer, err)
	}
	status, data, err := readResponse(bufio.NewReader(io.LimitReader(conn, maxResponseBytes+1)))
	if err == nil && len(data) > maxResponseBytes {
		err = errAnswerTooLarge
	}
	if err != nil {
		return fmt.Errorf("read %s answer: %w: %w", op, ErrNoAnswer, err)
	}
	if status != "200" {
		e := &Error{}
		if json.Unmarshal(data, e) != nil || e.Code == 0 {
			return &Error{Code: CodeInternal, Msg: fmt.Sprintf("overlayd answered %s to %s", status, op), Details: string(bytes.TrimSpace(data))}
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

// readResponse reads an HTTP/1.0 response whose body ends with the
// connection: the status code, then the body.
func readResponse(r *bufio.Reader) (status string, body []byte, err error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return "", nil, fmt.Errorf("status line: %w", err)
	}
	proto, rest, _ := strings.Cut(strings.TrimRight(line, "\r\n"), " ")
	status, _, _ = strings.Cut(rest, " ")
	if !strings.HasPrefix(proto, "HTTP/1.") || len(status) != 3 {
		return "", nil, fmt.Errorf("not an HTTP response: %q", line)
	}
	for {
		h, err := r.ReadString('\n')
		if err != nil {
			return "", nil, fmt.Errorf("headers: %w", err)
		}
		if h == "\r\n" || h == "\n" {
			break
		}
	}
	body, err = io.ReadAll(r)
	return status, body, err
}
